"""Per-family site maps: data, not code. Each row names modules by suffix for one `model_type`.

`lora`       default LoRA targets (the attention query/value projections, as in the LoRA paper)
`heads`      task heads that are newly initialised for SEQ_CLS / TOKEN_CLS and so must be trained and saved
`layers`     the name of the container whose numbered children are the transformer blocks
`checkpointing_keeps_cache`  False where the model's own code passes no cache to its blocks under
             gradient checkpointing (so prefix tuning cannot train with checkpointing there)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySites:
    lora: tuple[str, ...]
    layers: str
    seq_cls_heads: tuple[str, ...] = ("classifier", "score")
    token_cls_heads: tuple[str, ...] = ("classifier", "score")
    checkpointing_keeps_cache: bool = True


_ENC_HEADS = ("classifier",)
_DEBERTA_HEADS = ("pooler", "classifier")  # DeBERTa's ContextPooler is not in pretrained checkpoints
_ENCDEC_HEADS = ("classification_head",)

FAMILIES: dict[str, FamilySites] = {
    "bert": FamilySites(lora=("query", "value"), layers="layer", seq_cls_heads=_ENC_HEADS),
    "roberta": FamilySites(lora=("query", "value"), layers="layer", seq_cls_heads=_ENC_HEADS),
    "deberta": FamilySites(lora=("in_proj",), layers="layer", seq_cls_heads=_DEBERTA_HEADS),
    "deberta-v2": FamilySites(lora=("query_proj", "value_proj"), layers="layer", seq_cls_heads=_DEBERTA_HEADS),
    "gpt2": FamilySites(lora=("c_attn",), layers="h", checkpointing_keeps_cache=False),
    "bloom": FamilySites(lora=("query_key_value",), layers="h"),
    "opt": FamilySites(lora=("q_proj", "v_proj"), layers="layers"),
    "gpt_neo": FamilySites(lora=("q_proj", "v_proj"), layers="h"),
    "gptj": FamilySites(lora=("q_proj", "v_proj"), layers="h"),
    "t5": FamilySites(lora=("q", "v"), layers="block", seq_cls_heads=_ENCDEC_HEADS),
    "bart": FamilySites(lora=("q_proj", "v_proj"), layers="layers", seq_cls_heads=_ENCDEC_HEADS),
    "llama": FamilySites(lora=("q_proj", "v_proj"), layers="layers"),
    "qwen2": FamilySites(lora=("q_proj", "v_proj"), layers="layers"),
    "mistral": FamilySites(lora=("q_proj", "v_proj"), layers="layers"),
}

# Container names tried, in order, when a model's family is not in the table.
DEFAULT_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def model_type_of(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def family_of(model) -> FamilySites | None:
    return FAMILIES.get(model_type_of(model) or "")


def default_targets(model, site_key: str) -> tuple[str, ...] | None:
    family = family_of(model)
    return getattr(family, site_key, None) if family else None


def task_heads(model, task_type) -> tuple[str, ...]:
    """Heads to train and save for a task: newly initialised on top of a pretrained body."""
    kind = str(getattr(task_type, "value", task_type))
    family = family_of(model) or FamilySites(lora=(), layers="layers", seq_cls_heads=("classifier", "score", "classification_head"))
    if kind == "SEQ_CLS":
        return family.seq_cls_heads
    if kind == "TOKEN_CLS":
        return family.token_cls_heads
    return ()
