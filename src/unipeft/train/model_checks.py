"""Checks that a run's sequences fit the loaded model, made before it trains: a run that would overflow a
position table fails at once with the flag to change, not at the first long batch."""
from __future__ import annotations

import os

from .errors import UsageError
from .plan import TrainOptions


def check_model_fits(options: TrainOptions, task, head: str, config, model, tokenizer) -> None:
    _check_lengths(options, task, head, tokenizer, model)
    if config is not None and config.is_prompt_learning:
        _check_room_for_virtual_tokens(options, model)
    if options.sentence_encoder and getattr(config, "sentence_encoder", None):
        _check_sentence_encoder(options, config, tokenizer)


ANSWER_ROOM = 8  # tokens a label word may take after an evaluation prompt


def _check_lengths(options: TrainOptions, task, head: str, tokenizer, model) -> None:
    """Every sequence the run feeds the model must fit its position table, or the run would fail mid-way:
    the inputs; for a causal LM also prompt + answer in training, and the (in-context) prompt + what it
    generates or the label word it scores in evaluation."""
    from .model import check_max_length

    check_max_length(options.max_length, tokenizer, model, "--max-length")
    if head != "causal":
        return
    check_max_length(options.max_length + options.max_target_length, tokenizer, model,
                     "--max-length plus --max-target-length (a training prompt and its answer)")
    shots = options.shots if options.eval_mode == "icl" else 0
    answer = options.max_new_tokens or (task.max_new_tokens if task.kind == "generation" else ANSWER_ROOM)
    check_max_length(options.max_length * (1 + shots) + answer, tokenizer, model,
                     f"--max-length × (1 + {shots} shots) plus {answer} answer tokens (an evaluation prompt)")


def _check_room_for_virtual_tokens(options: TrainOptions, model) -> None:
    """Texts are cut at max_length tokens, and a prompt method adds num_virtual_tokens positions in front of
    them: refuse before training when both together overflow a learned position table (MiniLM: 512), which
    would otherwise fail at the first long batch. Models with relative or rotary positions have no such limit."""
    from ..compat import position_limit

    limit = position_limit(model)
    room = None if limit is None else limit - options.num_virtual_tokens
    if room is not None and options.max_length > room:
        if room < 1:
            raise UsageError(f"{options.num_virtual_tokens} virtual tokens leave no room for text in the model's "
                             f"{limit} positions; choose fewer --num-virtual-tokens")
        raise UsageError(f"max_length {options.max_length} plus {options.num_virtual_tokens} virtual tokens is more "
                         f"than the model's {limit} positions; use --max-length {room} or less (or fewer "
                         f"--num-virtual-tokens)")


def _check_sentence_encoder(options: TrainOptions, method_config, tokenizer) -> None:
    """A separate sentence encoder reads the base model's input_ids: it must know every id of the tokenizer and
    (with pg's encoder prompt in front) have positions for the longest text. Checked from its config alone."""
    from transformers import AutoConfig

    name = options.sentence_encoder
    extra = options.num_virtual_tokens if getattr(method_config, "learn_encoder_prompt", False) else 0
    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load sentence encoder {name!r}: {first_line}") from None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab < len(tokenizer):
        raise UsageError(f"sentence encoder {name!r} has {vocab} tokens but the model's tokenizer has "
                         f"{len(tokenizer)}; it must share the model's tokenizer")
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and options.max_length + extra > positions:
        raise UsageError(f"sentence encoder {name!r} has {positions} positions, fewer than max_length "
                         f"{options.max_length}" + (f" plus {extra} encoder-prompt tokens" if extra else ""))
