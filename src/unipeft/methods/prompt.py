"""Prompt tuning and P-tuning: learned virtual tokens prepended to the input embeddings.

Both learn a table of `num_virtual_tokens` vectors; P-tuning produces them with a small MLP or LSTM
(a training-time reparameterisation). The checkpoint holds the final vectors as `prompt_embeddings`
(Hugging Face PEFT's layout) and, beside it, the reparameterisation network so training can resume.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torch.nn as nn

from ..config import ConfigError, PeftConfig
from ..engine.checkpoint import CheckpointMismatchError
from ..engine.model_parts import check_and_copy
from ..virtual.inputs import TOKENS, VirtualInput
from ..registry import MethodSpec, Preset, register_method, register_preset

__all__ = ["PromptLearningConfig", "PromptTuningConfig", "PromptEncoderConfig", "PromptTuningInit",
           "PromptEncoderReparameterizationType"]

PROMPT_KEY = "prompt_embeddings"


class PromptTuningInit(str, enum.Enum):
    RANDOM = "RANDOM"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


def _model_dim(model_config, *names):
    for name in names:
        value = getattr(model_config, name, None)
        if value is not None:
            return value
    return None


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every prompt method shares (Hugging Face PEFT's names); model sizes are filled in from the model."""

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None

    def validate(self) -> None:
        super().validate()
        if self.num_virtual_tokens is None or self.num_virtual_tokens <= 0:
            raise ConfigError(
                f"{type(self).__name__}.num_virtual_tokens must be a positive number of virtual tokens, "
                f"got {self.num_virtual_tokens!r}"
            )

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def describe(self) -> str:
        return f"{self.num_virtual_tokens} virtual tokens"

    def model_sizes(self, model: nn.Module) -> dict:
        mc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return {
            "num_layers": _model_dim(mc, "num_hidden_layers", "num_layers", "n_layer"),
            "token_dim": _model_dim(mc, "hidden_size", "n_embd", "d_model"),
            "num_attention_heads": _model_dim(mc, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
        }

    def resolved(self, model: nn.Module) -> "PromptLearningConfig":
        """A copy with the model's sizes filled in, as Hugging Face PEFT records them in adapter_config.json;
        sizes already in the config (a saved adapter) must match the model."""
        values = {}
        for key, size in self.model_sizes(model).items():
            given = getattr(self, key)
            if size is None and given is None:
                raise ConfigError(f"cannot read {key} from {type(model.config).__name__}; set it in the config")
            if given is not None and size is not None and given != size:
                raise ConfigError(
                    f"{type(self).__name__}.{key}={given} but {type(model).__name__} has {size}: the adapter was "
                    f"made for another base model"
                )
            values[key] = size if given is None else given
        return replace(self, num_transformer_submodules=self.num_transformer_submodules or 1, **values)


class VirtualPrompt(VirtualInput):
    """A table of virtual vectors, optionally produced by a reparameterisation network `encoder`.

    `forward()` gives the vectors; `to_flat()` folds the network away (what inference needs).
    """

    def __init__(self, rows: int, width: int, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)
        self.encoder = encoder

    def forward(self) -> torch.Tensor:
        weight = self.embedding.weight
        return weight if self.encoder is None else self.encoder(weight)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {PROMPT_KEY: self().detach()}

    def training_tensors(self) -> dict[str, torch.Tensor]:
        if self.encoder is None:
            return {}
        return {f"prompt_encoder.{k}": v for k, v in self.state_dict(keep_vars=True).items()}

    def inference_numel(self) -> int:
        return self().numel()

    def to_flat(self, flat: torch.Tensor) -> None:
        self.encoder = None
        self.embedding = nn.Embedding(*flat.shape, device=flat.device, dtype=flat.dtype)

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        training = {k[len("prompt_encoder."):]: v for k, v in tensors.items() if k.startswith("prompt_encoder.")}
        if self.encoder is not None and training:
            check_and_copy(self.state_dict(keep_vars=True), training, source, "prompt_encoder.")
            return
        if PROMPT_KEY not in tensors:
            raise CheckpointMismatchError(f"{source} has no {PROMPT_KEY!r} tensor; it is not a prompt-method checkpoint")
        flat = tensors[PROMPT_KEY]
        expected = tuple(self().shape)
        if tuple(flat.shape) != expected:
            raise CheckpointMismatchError(
                f"{source}: {PROMPT_KEY} has shape {tuple(flat.shape)} but this model and config need {expected}; "
                f"the adapter was saved for another base model or num_virtual_tokens"
            )
        if self.encoder is not None:  # the file has no network: go on training the vectors themselves
            self.to_flat(flat)
        with torch.no_grad():
            self.embedding.weight.copy_(flat)


class PromptTokens(VirtualPrompt):
    """Prompt tuning and P-tuning: the first `num_virtual_tokens` rows are prepended to the input."""

    kind = TOKENS

    def __init__(self, num_virtual: int, rows: int, width: int, encoder: nn.Module | None = None) -> None:
        super().__init__(rows, width, encoder)
        self.num_virtual = num_virtual

    def tokens(self, inputs) -> torch.Tensor:
        return self()[: self.num_virtual].unsqueeze(0)


# ---- prompt tuning ---------------------------------------------------------------------------------
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    peft_type: Optional[str] = "PROMPT_TUNING"
    prompt_tuning_init: Union[str, PromptTuningInit] = PromptTuningInit.RANDOM
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def validate(self) -> None:
        super().validate()
        try:
            self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init)
        except ValueError:
            raise ConfigError(f"prompt_tuning_init must be one of {[i.value for i in PromptTuningInit]}, "
                              f"got {self.prompt_tuning_init!r}") from None
        if self.prompt_tuning_init == PromptTuningInit.TEXT and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path "
                              "(the tokenizer that turns the text into the initial tokens)")


def _initial_token_ids(config: PromptTuningConfig, rows: int, vocab: int) -> torch.Tensor | None:
    if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
        return torch.randint(0, vocab, (rows,))
    if config.prompt_tuning_init != PromptTuningInit.TEXT:
        return None
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    ids = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ConfigError("prompt_tuning_init_text tokenizes to nothing; give a non-empty text")
    return torch.tensor((ids * (rows // len(ids) + 1))[:rows])  # repeat the text to fill every row


def build_prompt_tuning(model: nn.Module, config: PromptTuningConfig, layers=()) -> PromptTokens:
    rows = config.num_virtual_tokens * config.num_transformer_submodules
    prompt = PromptTokens(config.num_virtual_tokens, rows, config.token_dim)
    embeddings = model.get_input_embeddings()
    ids = None if config.inference_mode else _initial_token_ids(config, rows, embeddings.weight.shape[0])
    if ids is not None:
        with torch.no_grad():
            prompt.embedding.weight.copy_(embeddings(ids.to(embeddings.weight.device)).float())
    return prompt


# ---- P-tuning --------------------------------------------------------------------------------------
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    peft_type: Optional[str] = "P_TUNING"
    encoder_reparameterization_type: Union[str, PromptEncoderReparameterizationType] = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(self.encoder_reparameterization_type)
        except ValueError:
            raise ConfigError("encoder_reparameterization_type must be 'MLP' or 'LSTM', "
                              f"got {self.encoder_reparameterization_type!r}") from None


class _LstmHead(nn.Module):
    """P-tuning's LSTM reparameterisation: a bidirectional LSTM over the vectors, then an MLP."""

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(dim, hidden, num_layers=layers, dropout=dropout, bidirectional=True, batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(x.unsqueeze(0))[0][0])


def build_p_tuning(model: nn.Module, config: PromptEncoderConfig, layers=()) -> PromptTokens:
    dim = config.token_dim
    hidden = config.encoder_hidden_size or dim
    if config.encoder_reparameterization_type == PromptEncoderReparameterizationType.LSTM:
        encoder = _LstmHead(dim, hidden, config.encoder_num_layers, config.encoder_dropout)
    else:
        encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))
    rows = config.num_virtual_tokens * config.num_transformer_submodules
    return PromptTokens(config.num_virtual_tokens, rows, dim, None if config.inference_mode else encoder)


register_method(MethodSpec("PROMPT_TUNING", PromptTuningConfig, None, "prompt_", model_part=build_prompt_tuning))
register_method(MethodSpec("P_TUNING", PromptEncoderConfig, None, "prompt_", model_part=build_p_tuning))


# Prompt methods move a few vectors a long way: they need a far larger step than weight-level methods.
register_preset(Preset("prompt", 1e-1, lambda k: PromptTuningConfig(
    task_type=k.task_type, num_virtual_tokens=k.num_virtual_tokens), "prompt tuning"))
register_preset(Preset("ptuning", 1e-1, lambda k: PromptEncoderConfig(
    task_type=k.task_type, num_virtual_tokens=k.num_virtual_tokens), "P-tuning, MLP encoder"))
