"""Adapter files in Hugging Face PEFT's layout, written atomically and read without unpickling.

    <dir>/adapter_config.json + <dir>/adapter_model.safetensors      adapter "default"
    <dir>/<name>/adapter_config.json + ...                           any other adapter
Keys read `base_model.model.<module path>.<part>.<param>` with the adapter name removed.
"""
from __future__ import annotations

import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


class CheckpointError(OSError):
    """An adapter file that is missing, unreadable or damaged; the message names the file."""


def _temp_path(final_path: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(final_path) or ".")
    os.close(fd)
    return tmp


def _write_temp(final_path: str, data: bytes) -> str:
    tmp = _temp_path(final_path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write_files(files: dict[str, bytes]) -> None:
    """Write every file to a temporary name first; rename only once all are complete.

    A failure (or interruption) before the renames leaves each previous file untouched.
    """
    temps: dict[str, str] = {}
    try:
        for path, data in files.items():
            temps[path] = _write_temp(path, data)
    except BaseException:
        for tmp in temps.values():
            os.unlink(tmp)
        raise
    for path, tmp in temps.items():
        os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_files({path: text.encode("utf-8")})


def save_adapter(directory: str, config_json: str, tensors: dict[str, torch.Tensor]) -> None:
    os.makedirs(directory, exist_ok=True)
    payload = {KEY_PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_files({
        os.path.join(directory, WEIGHTS_NAME): safetensors_bytes(payload, metadata={"format": "pt"}),
        os.path.join(directory, "adapter_config.json"): config_json.encode("utf-8"),
    })


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


def load_adapter_tensors(path, subfolder: str | None = None, allow_pickle: bool = False, **hub_kwargs) -> tuple[dict[str, torch.Tensor], str]:
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
    try:
        if file.endswith(".bin"):
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        else:
            tensors = load_file(file)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"adapter weights file {file} is corrupt or truncated: {exc}") from None
    return {k[len(KEY_PREFIX):] if k.startswith(KEY_PREFIX) else k: v for k, v in tensors.items()}, file
