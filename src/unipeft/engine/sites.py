"""Per-family site maps: data, not code. Each row names modules by suffix for one `model_type`.

(Which modules a method adapts by default is the method's own table: `MethodSpec.default_targets`.)
`block`      where block-level methods attach inside one transformer block (see `BlockSites`)
`heads`      task heads that are newly initialised for SEQ_CLS / TOKEN_CLS and so must be trained and saved
`layers`     the name of the container whose numbered children are the transformer blocks
`checkpointing_keeps_cache`  False where the model's own code passes no cache to its blocks under
             gradient checkpointing (so prefix tuning cannot train with checkpointing there)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch.nn as nn

from .layers import AdapterError


@dataclass(frozen=True)
class BlockSites:
    """Module paths relative to one transformer block ("-1" indexes the last child of a list).

    A site has two ends: `*_in`, the module whose first input is the site's input (captured by a
    pre-hook), and `*_out`, the projection whose output is the site's output before dropout and the
    residual. `ffn_norm` is the layer norm around the FFN: applied to FFN output + residual after it
    (post-norm models) or to the residual before it (pre-norm), as `ffn_norm_first(config)` says.
    `query` is the attention's query projection; `query_layout` says where the queries sit in its output:
    "plain", "fused" ([q | k | v], GPT-2) or "per_head" (per head [q, k, v], BLOOM and DeBERTa).
    `residual_is_normed(config)`: the pre-norm model adds back the norm's output, not its input (BLOOM's
    apply_residual_connection_post_layernorm).
    """
    attn_in: str
    attn_out: str
    ffn_in: str
    ffn_out: str
    ffn_norm: str
    query: str
    ffn_norm_first: Callable[[Any], bool] = lambda config: True
    query_layout: str = "plain"
    residual_is_normed: Callable[[Any], bool] = lambda config: False


_BERT_BLOCK = BlockSites("attention.self", "attention.output.dense", "intermediate", "output.dense", "output.LayerNorm",
                         "attention.self.query", lambda config: False)
_LLAMA_BLOCK = BlockSites("self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj", "post_attention_layernorm",
                          "self_attn.q_proj")


@dataclass(frozen=True)
class FamilySites:
    layers: str
    block: BlockSites | None = None
    seq_cls_heads: tuple[str, ...] = ("classifier", "score")
    token_cls_heads: tuple[str, ...] = ("classifier", "score")
    checkpointing_keeps_cache: bool = True


_ENC_HEADS = ("classifier",)
_DEBERTA_HEADS = ("pooler", "classifier")  # DeBERTa's ContextPooler is not in pretrained checkpoints
_ENCDEC_HEADS = ("classification_head",)

FAMILIES: dict[str, FamilySites] = {
    "bert": FamilySites(layers="layer", seq_cls_heads=_ENC_HEADS, block=_BERT_BLOCK),
    "roberta": FamilySites(layers="layer", seq_cls_heads=_ENC_HEADS, block=_BERT_BLOCK),
    "deberta": FamilySites(layers="layer", seq_cls_heads=_DEBERTA_HEADS,
                           block=replace(_BERT_BLOCK, query="attention.self.in_proj", query_layout="per_head")),
    "deberta-v2": FamilySites(layers="layer", seq_cls_heads=_DEBERTA_HEADS,
                              block=replace(_BERT_BLOCK, query="attention.self.query_proj")),
    "gpt2": FamilySites(layers="h", checkpointing_keeps_cache=False,
                        block=BlockSites("attn", "attn.c_proj", "mlp", "mlp.c_proj", "ln_2", "attn.c_attn",
                                         query_layout="fused")),
    "bloom": FamilySites(layers="h",
                         block=BlockSites("self_attention", "self_attention.dense", "mlp", "mlp.dense_4h_to_h",
                                          "post_attention_layernorm", "self_attention.query_key_value",
                                          query_layout="per_head",
                                          residual_is_normed=lambda c: c.apply_residual_connection_post_layernorm)),
    "opt": FamilySites(layers="layers",
                       block=BlockSites("self_attn", "self_attn.out_proj", "fc1", "fc2", "final_layer_norm",
                                        "self_attn.q_proj", lambda config: config.do_layer_norm_before)),
    "gpt_neo": FamilySites(layers="h",
                           block=BlockSites("attn.attention", "attn.attention.out_proj", "mlp", "mlp.c_proj", "ln_2",
                                            "attn.attention.q_proj")),
    # GPT-J runs attention and MLP side by side on ln_1's output; the residual is ln_1's input
    "gptj": FamilySites(layers="h",
                        block=BlockSites("attn", "attn.out_proj", "mlp", "mlp.fc_out", "ln_1", "attn.q_proj")),
    "t5": FamilySites(layers="block", seq_cls_heads=_ENCDEC_HEADS,
                      block=BlockSites("layer.0.SelfAttention", "layer.0.SelfAttention.o", "layer.-1.DenseReluDense",
                                       "layer.-1.DenseReluDense.wo", "layer.-1.layer_norm", "layer.0.SelfAttention.q")),
    "bart": FamilySites(layers="layers", seq_cls_heads=_ENCDEC_HEADS,
                        block=BlockSites("self_attn", "self_attn.out_proj", "fc1", "fc2", "final_layer_norm",
                                         "self_attn.q_proj", lambda config: False)),
    "llama": FamilySites(layers="layers", block=_LLAMA_BLOCK),
    "qwen2": FamilySites(layers="layers", block=_LLAMA_BLOCK),
    "mistral": FamilySites(layers="layers", block=_LLAMA_BLOCK),
}

# Container names tried, in order, when a model's family is not in the table.
DEFAULT_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def model_type_of(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def family_of(model) -> FamilySites | None:
    return FAMILIES.get(model_type_of(model) or "")


def default_targets(model, table: Mapping[str, tuple[str, ...]]) -> tuple[str, ...] | None:
    """A method's default targets for this model's family (None: the family is not in its table)."""
    return table.get(model_type_of(model) or "")


def task_heads(model, task_type) -> tuple[str, ...]:
    """Heads to train and save for a task: newly initialised on top of a pretrained body."""
    kind = str(getattr(task_type, "value", task_type))
    family = family_of(model) or FamilySites(layers="layers", seq_cls_heads=("classifier", "score", "classification_head"))
    if kind == "SEQ_CLS":
        return family.seq_cls_heads
    if kind == "TOKEN_CLS":
        return family.token_cls_heads
    return ()


def block_container_names(model) -> tuple[str, ...]:
    """The name of the ModuleList that holds the model's transformer blocks (the usual names, unknown families)."""
    family = family_of(model)
    return (family.layers,) if family else DEFAULT_LAYER_PATTERNS


def block_stacks(model, root=None) -> list[tuple[str, Any]]:
    """(path, ModuleList) of every stack of transformer blocks under `root` (default: the whole model; encoder
    and decoder are two stacks), in model order; paths are relative to `root`."""
    for name in block_container_names(model):
        stacks = [(path, module) for path, module in (root if root is not None else model).named_modules()
                  if isinstance(module, nn.ModuleList) and path.split(".")[-1] == name and "base_layer" not in path]
        if stacks:
            return stacks
    return []


def block_paths(model) -> list[str]:
    """Paths of every transformer block (all stacks: encoder and decoder), in model order."""
    return [f"{path}.{i}" for path, stack in block_stacks(model) for i in range(len(stack))]


def resolve_in_block(model, block_path: str, relative: str) -> str:
    """The absolute path of `relative` inside a block; a "-1" step names the last child of a list."""
    from .layers import innermost

    module, parts = model.get_submodule(block_path), []
    for step in relative.split("."):
        module = innermost(module)
        if step.lstrip("-").isdigit():
            step = str(int(step) % len(module))
        module = getattr(module, step) if not step.isdigit() else module[int(step)]
        parts.append(step)
    return f"{block_path}.{'.'.join(parts)}"


def block_sites_of(model, needed_by: str) -> BlockSites:
    """The family's block sites, or a clear error naming the method that needs them."""
    from ..config import ConfigError

    family = family_of(model)
    if family is None or family.block is None:
        raise ConfigError(f"{needed_by} needs the block sites (attention and FFN modules) of model_type "
                          f"{model_type_of(model)!r}, which are not known; supported: {sorted(FAMILIES)}")
    return family.block


def blocks_of(model: nn.Module, body: nn.Module) -> nn.ModuleList:
    """The transformer blocks inside `body` (the encoder for seq2seq), found by the family's container name."""
    stacks = block_stacks(model, body)
    if not stacks:
        raise AdapterError(f"cannot find the transformer blocks of {type(body).__name__} (looked for "
                           f"{', '.join(block_container_names(model))})")
    return stacks[0][1]


def _accepts(module: nn.Module, *names: str) -> bool:
    parameters = inspect.signature(module.forward).parameters
    return all(name in parameters for name in names)


def body_of(model: nn.Module) -> nn.Module:
    """The module that turns token ids into hidden states: the innermost one on the path to the input
    embeddings whose forward takes `inputs_embeds` and `attention_mask` (e.g. OPT's decoder, which its
    causal-LM class calls directly, or BERT's `bert`)."""
    embeddings = model.get_input_embeddings()
    path = next((name for name, module in model.named_modules() if module is embeddings), None)
    if path:
        parts = path.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            module = model.get_submodule(".".join(parts[:depth]))
            if _accepts(module, "inputs_embeds", "attention_mask"):
                return module
    return getattr(model, "base_model", model)
