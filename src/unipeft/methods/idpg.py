"""IDPG: instance-dependent prompt generation (Wu et al., 2022, arXiv:2204.04497).

Prompt tuning learns one prompt for every input; IDPG generates the prompt from the input. A frozen
sentence encoder turns the input into one vector (its hidden states averaged over the attention mask) and
a small generator maps that vector to the `t` virtual tokens:

    dropout -> Linear(d_enc -> m) -> GELU -> dropout -> Linear(m -> t * d_model)

The encoder is the base model itself by default (`"self"`: one extra frozen pass with every adapter off)
or a Hugging Face model that shares the base model's tokenizer (it reads the same `input_ids`). Options
from the paper: `phm_dim` makes both Linear layers PHM layers (W = sum_i A_i ⊗ B_i); `learn_encoder_prompt`
("PG") also learns `t` vectors prepended to the encoder's input; `multi_layer` (M-IDPG) gives every block
its own prompt from the same generator: the last layer's bias becomes one bias per block, the first
block's prompt is prepended to the input and block i's input has its first `t` positions replaced by
prompt i.

The whole generator is needed at inference, so it is the checkpoint, under `prompt_encoder.*` keys (which
the engine hands to `load_tensors` alone). The sentence encoder is never saved: it is the base model, or it
is loaded again from `sentence_encoder`.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..engine.checkpoint import CheckpointMismatchError
from ..engine.model_parts import check_and_copy
from ..engine.layers import AdapterError
from ..engine.sites import blocks_of, body_of
from ..virtual.inputs import TOKENS, VirtualInput
from ..registry import Knobs, MethodSpec, Preset, register_method, register_preset
from .prompt import PromptLearningConfig, _model_dim

__all__ = ["IDPGConfig"]

SELF = "self"
KEY_PREFIX = "prompt_encoder."


@dataclass
class IDPGConfig(PromptLearningConfig):
    peft_type: Optional[str] = "IDPG"
    generator_hidden_size: int = 384
    generator_dropout: float = 0.1
    # "self" (the base model, adapters off) or a Hugging Face model name or local path for AutoModel
    sentence_encoder: str = SELF
    sentence_encoder_hidden_size: Optional[int] = None  # checked against the encoder when given
    phm_dim: Optional[int] = None
    multi_layer: bool = False  # M-IDPG: a prompt for every block (shared generator, a bias per block)
    learn_encoder_prompt: bool = False

    def describe(self) -> str:
        encoder = "the model itself" if self.sentence_encoder == SELF else self.sentence_encoder
        prompt = " with a learned encoder prompt" if self.learn_encoder_prompt else ""
        return f"{self.num_virtual_tokens} virtual tokens, sentence encoder: {encoder}{prompt}"

    def validate(self) -> None:
        super().validate()
        if self.generator_hidden_size <= 0:
            raise ConfigError(f"IDPGConfig.generator_hidden_size must be positive, got {self.generator_hidden_size}")
        if not 0 <= self.generator_dropout < 1:
            raise ConfigError(f"IDPGConfig.generator_dropout must be in [0, 1), got {self.generator_dropout}")
        if not self.sentence_encoder:
            raise ConfigError("IDPGConfig.sentence_encoder must be 'self' or a model name or path, got an empty string")
        for name in ("sentence_encoder_hidden_size", "phm_dim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"IDPGConfig.{name} must be a positive number or None, got {value}")


class PHMLinear(nn.Module):
    """A Linear layer with a parameterised hypercomplex multiplication weight (Zhang et al., 2021):
    W = sum_i A_i ⊗ B_i, with A_i [n, n] (`rule`) and B_i [out/n, in/n] (`factors`), so it holds
    n^3 + in*out/n weights instead of in*out."""

    def __init__(self, in_features: int, out_features: int, n: int, bias: bool = True) -> None:
        super().__init__()
        self.rule = nn.Parameter(torch.empty(n, n, n))
        self.factors = nn.Parameter(torch.empty(n, out_features // n, in_features // n))
        self.bias = nn.Parameter(_bias_init(torch.empty(out_features), in_features)) if bias else None
        # Var(W) = n Var(A) Var(B): with std(A) = 1/n this matches nn.Linear's default initialisation.
        nn.init.normal_(self.rule, std=1 / n)
        nn.init.kaiming_uniform_(self.factors.view(-1, in_features // n), a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        n, rows, cols = self.factors.shape
        # kron(A, B)[p*rows + q, r*cols + s] = A[p, r] * B[q, s]
        return torch.einsum("ipr,iqs->pqrs", self.rule, self.factors).reshape(n * rows, n * cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _bias_init(bias: torch.Tensor, fan_in: int) -> torch.Tensor:
    """nn.Linear's default bias initialisation."""
    return nn.init.uniform_(bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))


def _linear(in_features: int, out_features: int, phm_dim: int | None, bias: bool = True) -> nn.Module:
    if phm_dim is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return PHMLinear(in_features, out_features, phm_dim, bias=bias)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """The encoder is frozen: it runs without dropout, so a sentence gets the same vector in training and inference."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class InstancePrompts(VirtualInput):
    """The generator (and the PG encoder prompt); `tokens()` encodes the input and generates its prompt."""

    kind = TOKENS
    per_instance = True  # generate() computes the prompt once from the input, not from the tokens it adds
    shallow_option = "multi_layer=False"

    def __init__(self, model: nn.Module, config: IDPGConfig, encoder: nn.Module | None, encoder_dim: int) -> None:
        super().__init__()
        self.num_virtual, self.width = config.num_virtual_tokens, config.token_dim
        m, p, n = config.generator_hidden_size, config.generator_dropout, config.phm_dim
        out = self.num_virtual * self.width
        self.deep = config.multi_layer
        self.generator = nn.Sequential(
            nn.Dropout(p), _linear(encoder_dim, m, n), nn.GELU(), nn.Dropout(p), _linear(m, out, n, bias=not self.deep),
        )
        self.sentence_encoder = encoder.requires_grad_(False).eval() if encoder is not None else None
        # The base model (for "self") sits in a plain tuple: as a submodule its weights would be counted,
        # trained and saved a second time.
        encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self._base = (model, model.get_encoder() if encoder_decoder else body_of(model))
        self.register_parameter("layer_bias", None)
        if self.deep:  # [blocks, t * d]: each block's bias for the shared generator's last layer
            blocks = len(blocks_of(model, self._base[1]))
            self.layer_bias = nn.Parameter(_bias_init(torch.empty(blocks, out), m))
        runs = encoder if encoder is not None else self._base[1]
        self._no_cache = {"use_cache": False} if "use_cache" in inspect.signature(runs.forward).parameters else {}
        self.register_parameter("encoder_prompt", None)
        if config.learn_encoder_prompt:
            embeddings = (encoder if encoder is not None else model).get_input_embeddings().weight
            ids = torch.randint(0, embeddings.shape[0], (self.num_virtual,), device=embeddings.device)
            self.encoder_prompt = nn.Parameter(embeddings[ids].detach().clone().float())  # rows of real words

    # ---- the frozen sentence encoder -------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The HF sentence encoder is a submodule (it moves with `.to()` and counts in the model's total) but
        stays frozen."""
        frozen = {id(q) for q in self.sentence_encoder.parameters()} if self.sentence_encoder is not None else set()
        return [p for p in self.parameters() if id(p) not in frozen]

    def train(self, mode: bool = True) -> "InstancePrompts":
        super().train(mode)
        if self.sentence_encoder is not None:
            self.sentence_encoder.eval()
        return self

    @contextlib.contextmanager
    def _frozen_pass(self):
        """The callable that encodes: the HF encoder, or the base model's body as it is without adapters (the
        shared state disabled, as `disable_adapter()` does, and the engine's hooks on the body bypassed)."""
        if self.sentence_encoder is not None:
            yield self.sentence_encoder
            return
        body = self._base[1]
        state = self.adapter_state
        disabled = state.disabled if state is not None else None
        try:
            if state is not None:
                state.disabled = True
            with _eval_mode(body):
                yield body.forward  # .forward: past the virtual-token hooks on the body
        finally:
            if state is not None:
                state.disabled = disabled

    def sentence_vectors(self, inputs: dict) -> torch.Tensor:
        """[B, d_enc]: the encoder's hidden states averaged over the attention mask (and the PG prompt)."""
        ids, mask, embeds = inputs.get("input_ids"), inputs.get("attention_mask"), inputs.get("inputs_embeds")
        if ids is None and (embeds is None or self.sentence_encoder is not None):
            raise AdapterError("IDPG encodes the input to make its prompt: pass input_ids (inputs_embeds only work "
                               "with sentence_encoder='self')")
        if self.sentence_encoder is not None:
            self._check_vocabulary(ids)
        encoder = self.sentence_encoder if self.sentence_encoder is not None else self._base[1]
        if self.encoder_prompt is not None:
            if embeds is None:
                embeds = encoder.get_input_embeddings()(ids)
            rows, length = embeds.shape[:2]
            embeds = torch.cat([self.encoder_prompt.to(embeds.dtype).expand(rows, -1, -1), embeds], dim=1)
            mask = torch.ones(rows, length, dtype=torch.long, device=embeds.device) if mask is None else mask
            mask = torch.cat([mask.new_ones(rows, self.num_virtual), mask], dim=1)
        call = {"input_ids": ids} if embeds is None else {"inputs_embeds": embeds}
        # The encoder is frozen; only the PG prompt before it needs the gradient through it.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_prompt is not None), \
                self._frozen_pass() as run:
            hidden = run(**call, attention_mask=mask, **self._no_cache)[0]
        return _mean_pool(hidden, mask)

    def _check_vocabulary(self, ids: torch.Tensor) -> None:
        vocab = self.sentence_encoder.get_input_embeddings().weight.shape[0]
        if ids.numel() and int(ids.max()) >= vocab:
            raise AdapterError(
                f"input id {int(ids.max())} is outside the sentence encoder's vocabulary of {vocab} tokens; the "
                f"encoder reads the base model's input_ids, so choose one that shares the base model's tokenizer"
            )

    # ---- the VirtualInput interface --------------------------------------------------------------
    def tokens(self, inputs) -> torch.Tensor:
        vectors = self.sentence_vectors(inputs).to(self.generator[1].bias.dtype)
        prompts = self.generator(vectors)
        if self.layer_bias is None:
            return prompts.view(-1, self.num_virtual, self.width)
        prompts = prompts.unsqueeze(1) + self.layer_bias  # [B, blocks, t * d]
        return prompts.view(prompts.shape[0], -1, self.num_virtual, self.width)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        state = self.state_dict(keep_vars=True)
        return {KEY_PREFIX + k: v for k, v in state.items() if not k.startswith("sentence_encoder.")}

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = self.checkpoint_tensors()
        found = {k: v for k, v in tensors.items() if k.startswith(KEY_PREFIX)}
        if not found:
            raise CheckpointMismatchError(
                f"{source} has no IDPG generator tensors ({KEY_PREFIX}*), only {sorted(tensors)[:5]}; "
                f"it is not an IDPG checkpoint"
            )
        stray = sorted(k for k in tensors if "." not in k)
        if stray:
            raise CheckpointMismatchError(f"{source}: tensors {stray} are not made by an IDPG config")
        check_and_copy(expected, found, source)


def _load_encoder(name: str) -> nn.Module:
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load sentence_encoder {name!r} with AutoModel.from_pretrained: {exc}") from None


def _check_phm(n: int | None, layers: dict[str, tuple[int, int]]) -> None:
    for layer, (fan_in, fan_out) in layers.items():
        if n is not None and (fan_in % n or fan_out % n):
            raise ConfigError(
                f"phm_dim={n} must divide both sizes of the generator's {layer} layer ({fan_in} -> {fan_out}); "
                f"choose a phm_dim that divides them or change generator_hidden_size"
            )


def build_idpg(model: nn.Module, config: IDPGConfig, layers=()) -> InstancePrompts:
    if config.sentence_encoder == SELF:
        encoder, encoder_dim, what = None, config.token_dim, "sentence_encoder='self' (the base model)"
    else:
        encoder = _load_encoder(config.sentence_encoder)
        encoder_dim = _model_dim(encoder.config, "hidden_size", "n_embd", "d_model")
        what = f"sentence_encoder {config.sentence_encoder!r}"
    if config.sentence_encoder_hidden_size is not None and encoder_dim != config.sentence_encoder_hidden_size:
        raise ConfigError(
            f"{what} has hidden size {encoder_dim} but sentence_encoder_hidden_size={config.sentence_encoder_hidden_size}; "
            f"set sentence_encoder_hidden_size={encoder_dim} (or None to read it from the encoder)"
        )
    m = config.generator_hidden_size
    _check_phm(config.phm_dim, {"first": (encoder_dim, m), "second": (m, config.num_virtual_tokens * config.token_dim)})
    # the generator's dropout follows the model's mode: a model wrapped in eval mode gives the same prompt every call
    return InstancePrompts(model, config, encoder, encoder_dim).train(model.training)


register_method(MethodSpec("IDPG", IDPGConfig, None, "prompt_", model_part=build_idpg))


def _idpg(knobs: Knobs, learn_encoder_prompt: bool = False) -> IDPGConfig:
    # The generator keeps its own defaults (hidden size 384, dropout 0.1); the sentence encoder is the base
    # model itself unless --sentence-encoder names a model that shares its tokenizer.
    encoder = os.path.expanduser(knobs.sentence_encoder) if knobs.sentence_encoder else SELF
    return IDPGConfig(task_type=knobs.task_type, num_virtual_tokens=knobs.num_virtual_tokens, sentence_encoder=encoder,
                      learn_encoder_prompt=learn_encoder_prompt)


register_preset(Preset("idpg", 3e-3, _idpg, "IDPG: a generator makes each input's prompt from a frozen sentence encoding"))
register_preset(Preset("pg", 3e-3, lambda k: _idpg(k, learn_encoder_prompt=True),
                       "IDPG with a learned prompt in front of the encoder's input too"))
