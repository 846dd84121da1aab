"""The capability table: one row per method, read by the property suite (tests/test_properties.py) and the
README matrices (tests/support_matrix.py). A new method is one row here.

A row says how to build the method's config for a task and what to expect of it: whether it is the identity
at init, whether it merges into the weights, whether rows of one batch can use different adapters, which
families it cannot attach to, and, where we have one, a formula for its trainable-parameter count written
from the model's shapes and HF PEFT's tables of default targets (never from unipeft's own count).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from peft.utils import constants as peft_tables
from transformers.pytorch_utils import Conv1D

import families as F
from adapter_checks import NO_BIAS, NO_CACHE, randomize
import unipeft

R = 8  # rank / bottleneck
T = 3  # virtual tokens
H = 16  # hidden size of the prompt encoders' MLPs
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS")  # tasks whose newly initialised head is trained and saved
GENERATIVE_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


# ---- shapes, computed without unipeft ---------------------------------------------------------------------
def head_paths(model: nn.Module, task: str) -> list[str]:
    """A classifier's new head: its top-level children with parameters outside the pretrained backbone."""
    if task not in HEAD_TASKS:
        return []
    return [name for name, child in model.named_children()
            if name != model.base_model_prefix and any(True for _ in child.parameters())]


def in_out_features(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    return tuple(weight.shape) if isinstance(module, Conv1D) else tuple(weight.shape[::-1])  # Conv1D: [in, out]


def peft_targets(model: nn.Module, task: str, table: dict, exclude=()) -> list[str]:
    """The linear modules whose names end with one of HF PEFT's default suffixes for this family, outside the head."""
    suffixes = table[model.config.model_type]
    heads = head_paths(model, task)
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and any(name == s or name.endswith("." + s) for s in suffixes)
            and not any(name.startswith(h + ".") for h in heads) and name not in exclude]


def per_target(table: dict, numel: Callable[[str, int, int], int], exclude=()):
    """A count formula: numel(path, in, out) summed over the default targets."""
    def count(model, task):
        return sum(numel(p, *in_out_features(model.get_submodule(p))) for p in peft_targets(model, task, table, exclude))
    return count


def ia3_numel(path: str, fan_in: int, fan_out: int, model_type: str) -> int:
    feedforward = peft_tables.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]
    return fan_in if any(path == s or path.endswith("." + s) for s in feedforward) else fan_out


def ia3_count(model, task):
    return sum(ia3_numel(p, *in_out_features(model.get_submodule(p)), model.config.model_type)
               for p in peft_targets(model, task, peft_tables.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING))


def bias_count(model, task):
    """Every bias outside the head and BERT's pooler (excluded by the row's config)."""
    heads = head_paths(model, task)
    return sum(p.numel() for n, p in model.named_parameters()
               if n.endswith(".bias") and not any(n.startswith(h + ".") for h in heads) and "pooler" not in n.split("."))


def ln_count(model, task):
    """HF PEFT's LN-tuning targets where its table has the family, else every normalisation layer (a *Norm class)."""
    suffixes = peft_tables.TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING.get(model.config.model_type)
    heads = head_paths(model, task)
    chosen = [m for n, m in model.named_modules() if not any(n.startswith(h + ".") for h in heads)
              and (any(n == s or n.endswith("." + s) for s in suffixes) if suffixes else type(m).__name__.endswith("Norm"))]
    return sum(p.numel() for m in chosen for p in m.parameters())


def dims(model) -> tuple[int, int, int]:
    """(hidden size, layers, key/value width) from the config's own names."""
    c = model.config
    d = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or c.d_model
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None) or c.num_layers
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None) or c.num_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    return d, layers, d // heads * kv


def mlp(widths: list[int]) -> int:
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def prompt_count(model, task):
    d, _, _ = dims(model)
    return T * d, T * d


def ptuning_count(model, task):  # PEFT's MLP encoder: d -> h -> h -> d, folded into the T vectors for inference
    d, _, _ = dims(model)
    return T * d + mlp([d, H, H, d]), T * d


def prefix_count(model, task):  # the MLP reads token_dim, the key/value width for grouped-query models
    _, layers, kv = dims(model)
    return T * kv + mlp([kv, H, layers * 2 * kv]), T * layers * 2 * kv


def blocks(model) -> int:
    """Transformer blocks: the encoder's and the decoder's in an encoder-decoder model."""
    c = model.config
    if not getattr(c, "is_encoder_decoder", False):
        return dims(model)[1]
    encoder = getattr(c, "encoder_layers", None) or c.num_layers
    return encoder + (getattr(c, "decoder_layers", None) or getattr(c, "num_decoder_layers", None) or encoder)


def attention_layers(model) -> int:
    """Attentions in the model: an encoder-decoder's decoder blocks have two (self and cross)."""
    c = model.config
    return blocks(model) + (blocks(model) - (getattr(c, "encoder_layers", None) or c.num_layers)
                            if getattr(c, "is_encoder_decoder", False) else 0)


def adapter_count(sites: int, norm: bool = False, scalar: bool = False):
    """Bottleneck adapters (Houlsby et al.): per block and site a down projection d -> R and an up projection
    R -> d with biases, a LayerNorm before it (Pfeiffer's `in` option), a learned output scale (scaled parallel)."""
    def count(model, task):
        d = dims(model)[0]
        return blocks(model) * sites * (2 * d * R + R + d + 2 * d * norm + scalar)
    return count


def mam_count(model, task):
    """He et al.'s MAM: a 3-token prefix at every attention from an MLP of width 8, and a parallel FFN adapter."""
    _, _, kv = dims(model)
    sites = attention_layers(model)
    ffn = adapter_count(1)(model, task)
    return ffn + 3 * kv + mlp([kv, 8, sites * 2 * kv]), ffn + 3 * sites * 2 * kv


def lora_pfeiffer_count(model, task):  # LoRA on the attention (HF PEFT's default targets), Pfeiffer at the FFN
    return per_target(LORA, lambda p, i, o: R * (i + o))(model, task) + adapter_count(1, norm=True)(model, task)


def cross_attn_count(model, task):
    """He et al.'s prefix as its own attention branch: 3 keys and values per block from an MLP of width 8, a
    LayerNorm over each block's branch output (cross_attn), and a sequential FFN adapter."""
    d, _, kv = dims(model)
    n, ffn = blocks(model), adapter_count(1)(model, task)
    return ffn + 3 * kv + mlp([kv, 8, n * 2 * kv]) + n * 2 * d, ffn + 3 * n * 2 * kv + n * 2 * d


def lokr_numel(path: str, fan_in: int, fan_out: int) -> int:
    """LoKr on a linear layer (decompose_both off): ΔW = w1 ⊗ w2 over HF PEFT's factorisation of in and out
    (its own function), w1 whole, w2 whole or a rank-R pair when R is under half its larger side."""
    from peft.tuners.lokr.layer import factorization

    (in_m, in_n), (out_l, out_k) = factorization(fan_in), factorization(fan_out)
    w2 = out_k * in_n if R >= max(out_k, in_n) / 2 else R * (out_k + in_n)
    return out_l * in_m + w2


def idpg_count(model, task):  # the generator reads the pooled sentence vector and writes T virtual tokens
    d, _, _ = dims(model)
    return mlp([d, H, T * d])


# ---- the table --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    build: Callable[[str], object]  # task type -> config
    identity_at_init: bool = True
    mergeable: bool = False  # merge_adapter() folds it into the weights exactly; otherwise refused clearly
    mixed_batch: bool = True  # rows of one batch may use different adapters; otherwise refused clearly
    skip_families: frozenset = frozenset()  # refused with a clear error (tested in the method's own file)
    # (model, task) -> trainable adapter parameters without the head copies, or (trainable, kept for inference)
    count: Optional[Callable] = None
    # HF PEFT's twin of the config, (library module, task) -> config, and the cells where both libraries must read
    # each other's files (tests/test_properties.py; methods with richer interop checks keep them in their own file)
    twin: Optional[Callable] = None
    twin_cells: tuple = ()

    def counts(self, model, task) -> tuple[int, int]:
        found = self.count(model, task)
        return found if isinstance(found, tuple) else (found, found)


LORA = peft_tables.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
# PEFT's AdaLoRA table lacks some families (Mistral); unipeft falls back to LoRA's targets there
ADALORA = {**LORA, **peft_tables.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING}
PROMPT = dict(identity_at_init=False, mixed_batch=False)  # virtual tokens: extra positions, one per batch
PREFIX = dict(PROMPT, skip_families=frozenset(NO_CACHE))
WEIGHTS = dict(mergeable=True)

METHODS: dict[str, Method] = {
    "lora": Method(lambda task: unipeft.LoraConfig(task_type=task, r=R, lora_alpha=2 * R), **WEIGHTS,
                   count=per_target(LORA, lambda p, i, o: R * (i + o))),
    "dora": Method(lambda task: unipeft.LoraConfig(task_type=task, r=R, lora_alpha=2 * R, use_dora=True), **WEIGHTS,
                   count=per_target(LORA, lambda p, i, o: R * (i + o) + o)),  # + one magnitude per output row
    "loha": Method(lambda task: unipeft.LoHaConfig(task_type=task, r=R, alpha=2 * R), **WEIGHTS,
                   count=per_target(LORA, lambda p, i, o: 2 * R * (i + o)),  # two rank-r pairs
                   twin=lambda lib, task: lib.LoHaConfig(task_type=task, r=R, alpha=2 * R, init_weights=False),
                   twin_cells=(("bert", "SEQ_CLS"), ("t5", "SEQ_2_SEQ_LM"), ("llama", "CAUSAL_LM"))),  # PEFT: nn.Linear only
    "lokr": Method(lambda task: unipeft.LoKrConfig(task_type=task, r=R, alpha=2 * R), **WEIGHTS,
                   count=per_target(LORA, lokr_numel)),
    "oft": Method(lambda task: unipeft.OFTConfig(task_type=task, r=0, oft_block_size=4), **WEIGHTS,
                  count=per_target(LORA, lambda p, i, o: i // 4 * (4 * 3 // 2))),  # a skew-symmetric 4 × 4 per block
    # the feature-extraction loss reads the last hidden state only, which BERT's pooler (a default target) does not reach
    "adalora": Method(lambda task: unipeft.AdaLoraConfig(task_type=task, init_r=R, target_r=R // 2, total_step=100,
                                                 exclude_modules=["pooler.dense"]), **WEIGHTS,
                      count=per_target(ADALORA, lambda p, i, o: R * (i + 1 + o), exclude=("pooler.dense",))),
    "ia3": Method(lambda task: unipeft.IA3Config(task_type=task), **WEIGHTS, count=ia3_count),
    "bitfit": Method(lambda task: unipeft.BitFitConfig(task_type=task, exclude_modules=["pooler.dense"]), **WEIGHTS,
                     skip_families=frozenset(NO_BIAS), count=bias_count),
    "ln_tuning": Method(lambda task: unipeft.LNTuningConfig(task_type=task), **WEIGHTS, count=ln_count,
                        twin=lambda lib, task: lib.LNTuningConfig(task_type=task),
                        twin_cells=tuple((f, F.tasks_of(f)[-1]) for f in F.FAMILIES
                                         if f in peft_tables.TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING)),
    "vera": Method(lambda task: unipeft.VeraConfig(task_type=task, r=R), **WEIGHTS,  # + λ_b per output, λ_d per rank
                   count=per_target(peft_tables.TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING, lambda p, i, o: o + R),
                   twin=lambda lib, task: lib.VeraConfig(task_type=task, r=R, init_weights=False),
                   twin_cells=(("bert", "SEQ_CLS"), ("opt", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"), ("bart", "SEQ_2_SEQ_LM"),
                               ("llama", "CAUSAL_LM"), ("qwen2", "CAUSAL_LM"))),  # PEFT asks fan_in_fan_out for Conv1D
    "houlsby": Method(lambda task: unipeft.HoulsbyConfig(task_type=task, bottleneck_size=R),
                      count=adapter_count(2)),  # after attention and after the FFN
    "pfeiffer": Method(lambda task: unipeft.PfeifferConfig(task_type=task, bottleneck_size=R, layernorm_option="in"),
                       count=adapter_count(1, norm=True)),  # after the FFN only
    "parallel": Method(lambda task: unipeft.ParallelAdapterConfig(task_type=task, bottleneck_size=R),
                       count=adapter_count(1)),
    "scaled_parallel": Method(lambda task: unipeft.ScaledParallelAdapterConfig(task_type=task, bottleneck_size=R,
                                                                       scalar="learnable_scalar"),
                              count=adapter_count(1, scalar=True)),
    "mam": Method(lambda task: unipeft.MAMConfig(task_type=task, attn_bn=3, ffn_bn=R, mid_dim=8), **PREFIX,
                  count=mam_count),
    "lora+pfeiffer": Method(lambda task: unipeft.UnifiedConfig(
        task_type=task, attn_mode="lora", attn_bn=R, ffn_mode="adapter", ffn_option="pfeiffer", ffn_bn=R,
        ffn_adapter_layernorm_option="in"), count=lora_pfeiffer_count),
    "adapter+lora": Method(lambda task: unipeft.UnifiedConfig(
        task_type=task, attn_mode="adapter", attn_option="parallel", attn_bn=R, ffn_mode="lora", ffn_bn=R)),
    # the prefix as a separate attention branch (no cache needed, not zero at init) and a sequential FFN adapter
    "cross_attn": Method(lambda task: unipeft.UnifiedConfig(
        task_type=task, attn_mode="prefix", attn_option="cross_attn", attn_bn=3, mid_dim=8, ffn_mode="adapter",
        ffn_option="sequential", ffn_bn=R), identity_at_init=False, count=cross_attn_count),
    "prompt": Method(lambda task: unipeft.PromptTuningConfig(task_type=task, num_virtual_tokens=T), **PROMPT, count=prompt_count),
    "ptuning": Method(lambda task: unipeft.PromptEncoderConfig(task_type=task, num_virtual_tokens=T, encoder_hidden_size=H),
                      **PROMPT, count=ptuning_count),
    "prefix": Method(lambda task: unipeft.PrefixTuningConfig(task_type=task, num_virtual_tokens=T, prefix_projection=True,
                                                     encoder_hidden_size=H), **PREFIX, count=prefix_count),
    "idpg": Method(lambda task: unipeft.IDPGConfig(task_type=task, num_virtual_tokens=T, generator_hidden_size=H,
                                           generator_dropout=0.0), **PROMPT, count=idpg_count),
}


def cells(methods=None, tasks=None, where: Callable[[Method], bool] = lambda m: True) -> list[tuple[str, str, str]]:
    """(method, family, task) for every row and supported cell, narrowed by methods, tasks and a capability."""
    return [(m, f, t) for m, row in METHODS.items() if (methods is None or m in methods) and where(row)
            for f, t in F.MATRIX if (tasks is None or t in tasks) and f not in row.skip_families]


def make(method: str, family: str, task: str, seed: int = 0, name: str = "default"):
    """The method on a fresh model, every adapter tensor moved away from its init (so each check sees a change)."""
    torch.manual_seed(seed)
    model = unipeft.get_peft_model(F.make_model(family, task), METHODS[method].build(task), adapter_name=name)
    return randomize(model, name, 100 + seed)


def params(selected):
    """Parametrize a test over (method, family, task) cells, each named "method-family-task"."""
    import pytest

    return pytest.mark.parametrize("method,family,task", [pytest.param(*c, id="-".join(c)) for c in selected])
