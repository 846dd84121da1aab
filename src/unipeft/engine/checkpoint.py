"""Adapter files in Hugging Face PEFT's layout, written atomically and read without unpickling.

    <dir>/adapter_config.json + <dir>/adapter_model.safetensors      adapter "default"
    <dir>/<name>/adapter_config.json + ...                           any other adapter
Keys read `base_model.model.<module path>.<part>.<param>` with the adapter name removed; prompt
methods store `prompt_embeddings` at the top level, tensors an adapter shares across layers `base_model.<part>`. What the PEFT layout drops but training needs
(reparameterisation networks) goes to `adapter_training_state.safetensors` beside it.
"""
from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..atomic_files import atomic_write_files

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
TRAINING_STATE_NAME = "adapter_training_state.safetensors"
KEY_PREFIX = "base_model.model."
PROMPT_KEY_PREFIX = "base_model."  # PEFT's prompt methods hold the model itself as `base_model`
MODEL_PART_PREFIX = "base_model."  # tensors an adapter shares across layers: base_model.<part> (VeRA's vera_A)


def key_prefix(config) -> str:
    return PROMPT_KEY_PREFIX if getattr(config, "is_prompt_learning", False) else KEY_PREFIX


class CheckpointError(OSError):
    """An adapter file that is missing, unreadable or damaged; the message names the file."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit this model (another base model, another config, a damaged file)."""


def file_key(key: str, prefix: str) -> str:
    """A tensor's key in the file: module tensors under `prefix`; top-level ones (`prompt_embeddings`) and
    model-level parts (already `base_model.<part>`) as they are."""
    return key if "." not in key or key.startswith(MODEL_PART_PREFIX) else prefix + key


def _payload(tensors: dict[str, torch.Tensor], prefix: str) -> bytes:
    data = {file_key(k, prefix): v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return safetensors_bytes(data, metadata={"format": "pt"})


def save_adapter(directory: str, config_json: str, tensors: dict[str, torch.Tensor],
                 training_tensors: dict[str, torch.Tensor] | None = None, prefix: str = KEY_PREFIX) -> None:
    """Write one adapter; a training-state file is written with it, or a stale one removed."""
    os.makedirs(directory, exist_ok=True)
    files = {
        os.path.join(directory, WEIGHTS_NAME): _payload(tensors, prefix),
        os.path.join(directory, "adapter_config.json"): config_json.encode("utf-8"),
    }
    training_file = os.path.join(directory, TRAINING_STATE_NAME)
    if training_tensors:
        files[training_file] = _payload(training_tensors, "")
    atomic_write_files(files)
    if not training_tensors and os.path.exists(training_file):
        os.unlink(training_file)


def resolve_file(path, filename: str, subfolder: str | None = None, **hub_kwargs) -> str:
    """A local file under `path`, or one downloaded from the Hub when `path` is not a local folder."""
    path = os.fspath(path)
    folder = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(path):
        candidate = os.path.join(folder, filename)
        if not os.path.isfile(candidate):
            found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            raise CheckpointError(f"adapter file {candidate} does not exist (the folder holds {found})")
        return candidate
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(path, filename, subfolder=subfolder, **hub_kwargs)
    except Exception as exc:  # every hub failure becomes one clear message
        raise CheckpointError(
            f"cannot find {filename} for adapter {path!r}: it is not a local folder and the Hub lookup failed ({exc})"
        ) from None


def load_adapter_tensors(path, subfolder: str | None = None, allow_pickle: bool = False, prefix: str = KEY_PREFIX,
                         **hub_kwargs) -> tuple[dict[str, torch.Tensor], str]:
    """The adapter tensors with the `base_model.model.` prefix removed, and the file they came from."""
    try:
        file = resolve_file(path, WEIGHTS_NAME, subfolder, **hub_kwargs)
    except CheckpointError:
        if not allow_pickle:
            pickled = os.path.join(os.fspath(path), subfolder or "", PICKLE_WEIGHTS_NAME)
            if os.path.isfile(pickled):
                raise CheckpointError(
                    f"{pickled} is a pickle file, which can run code when loaded; pass allow_pickle=True "
                    f"if you trust it, or convert it to {WEIGHTS_NAME}"
                ) from None
            raise
        file = resolve_file(path, PICKLE_WEIGHTS_NAME, subfolder, **hub_kwargs)
    tensors = _read_tensors(file)
    training_file = os.path.join(os.path.dirname(file), TRAINING_STATE_NAME)
    if os.path.isfile(training_file):
        tensors.update(_read_tensors(training_file))
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}, file


def _read_tensors(file: str) -> dict[str, torch.Tensor]:
    try:
        if file.endswith(".bin"):
            return torch.load(file, map_location="cpu", weights_only=True)
        return load_file(file)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"adapter weights file {file} is corrupt or truncated: {exc}") from None
