"""The unified design space (He et al., ICLR 2022) as one config, and the MAM adapter as a point of it.

`UnifiedConfig` carries the axes of the original code (attn_mode, attn_option, attn_composition, attn_bn,
ffn_mode, ffn_option, ffn_adapter_*, ffn_bn, mid_dim, prefix_dropout, lora_*). It is the union form:
an adapter made from it is the union of the plain method configs its axes choose (`components`), all
under one adapter name, so every part saves, loads, switches and deletes together. The parts apply in
the order of the model's forward; where two sit on one module, the one listed first here sits inside.

Prefix forms: `concat` prepends l keys and values to every attention (prefix tuning); its joint softmax
is exactly the gated add (1 - λ) h + λ softmax(q P_kᵀ) P_v, so concat takes attn_composition "add" (the
original code's spelling) or "gate_add", and `cross_attn_noln` + "gate_add" is the same function.

The MLP-reparameterised prefix (attn_mode "prefix") trains at `prefix_lr_scale` (0.1) times the optimizer's
learning rate, a unipeft axis: He et al. train it at 1e-4, and at the 1e-3 that suits the adapters it shares
a model with (MAM) it overruns the attention and the model stops learning, in every implementation (see
`PrefixTuningConfig.projection_lr_scale`). With the default, one learning rate of 1e-3 trains the adapter
at 1e-3 and the prefix as the paper does; prefix_lr_scale=1.0 restores the original dynamics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Optional, Union

from ..config import ConfigError, PeftConfig
from ..engine.sites import block_paths, block_sites_of, resolve_in_block
from ..registry import Knobs, MethodSpec, Preset, register_method, register_preset

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["UnifiedConfig", "MAMConfig"]

ATTN_MODES = ("none", "prefix", "prefix_nomlp", "lora", "adapter", "prompt_tuning", "bitfit")
ATTN_OPTIONS = ("none", "concat", "cross_attn", "cross_attn_noln", "cross_attn_relu", "parallel", "sequential")
# Which attn_option values each attn_mode takes (the first is the default when attn_option is None).
_OPTIONS_OF_MODE = {
    "prefix": ("concat", "cross_attn", "cross_attn_noln", "cross_attn_relu"),
    "prefix_nomlp": ("concat", "cross_attn", "cross_attn_noln", "cross_attn_relu"),
    "adapter": ("parallel", "sequential"),
}


# The design-space axes (the original code's option names), as the command line exposes them.
AXES = ("attn_mode", "attn_option", "attn_composition", "attn_bn", "ffn_mode", "ffn_option",
        "ffn_adapter_layernorm_option", "ffn_adapter_init_option", "ffn_adapter_scalar", "ffn_bn", "mid_dim",
        "prefix_dropout", "prefix_lr_scale", "lora_alpha", "lora_dropout", "lora_init")


@dataclass
class UnifiedConfig(PeftConfig):
    AXES: ClassVar[tuple[str, ...]] = AXES
    peft_type: Optional[str] = "UNIFIED"
    attn_mode: Literal["none", "prefix", "prefix_nomlp", "lora", "adapter", "prompt_tuning", "bitfit"] = "none"
    attn_option: Optional[Literal["none", "concat", "cross_attn", "cross_attn_noln", "cross_attn_relu", "parallel",
                                  "sequential"]] = None
    attn_composition: Literal["add", "gate_add"] = "add"
    attn_bn: int = 200  # prefix length l, attention adapter bottleneck, LoRA rank or prompt length
    ffn_mode: Literal["none", "adapter", "lora"] = "none"
    ffn_option: Optional[Literal["parallel", "sequential", "pfeiffer", "none"]] = None
    ffn_adapter_layernorm_option: Literal["in", "out", "none"] = "none"
    ffn_adapter_init_option: Literal["bert", "lora"] = "lora"
    ffn_adapter_scalar: Union[float, str] = 1.0  # a number or "learnable_scalar"
    ffn_bn: int = 64  # FFN adapter bottleneck or LoRA rank
    mid_dim: int = 800  # hidden size of the prefix reparameterisation MLP
    prefix_dropout: float = 0.0
    # unipeft: the prefix MLP trains at this multiple of the learning rate (see the module docstring)
    prefix_lr_scale: float = 0.1
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_init: Literal["lora", "bert"] = "lora"  # "bert": both LoRA factors random (B not zero)
    layers_to_transform: Optional[Union[list[int], int]] = None
    modules_to_save: Optional[list[str]] = None

    def describe(self) -> str:
        return ", ".join(f"{axis}={getattr(self, axis)}" for axis in ("attn_mode", "attn_option", "attn_bn", "ffn_mode",
                                                                        "ffn_option", "ffn_bn"))

    def validate(self) -> None:
        super().validate()
        self.attn_option = self._option("attn", self.attn_mode, self.attn_option, _OPTIONS_OF_MODE)
        self.ffn_option = self._option("ffn", self.ffn_mode, self.ffn_option, {"adapter": ("parallel", "sequential", "pfeiffer")})
        if self.attn_composition == "gate_add" and self.attn_option not in ("concat", "cross_attn_noln"):
            raise ConfigError(
                f"UnifiedConfig: attn_composition='gate_add' is the prefix gate, which needs the attention's own "
                f"softmax normaliser: use it with attn_mode='prefix'/'prefix_nomlp' and attn_option 'concat' or "
                f"'cross_attn_noln', not attn_mode={self.attn_mode!r} with attn_option={self.attn_option!r}"
            )
        if isinstance(self.ffn_adapter_scalar, str) and self.ffn_adapter_scalar != "learnable_scalar":
            try:
                self.ffn_adapter_scalar = float(self.ffn_adapter_scalar)  # the original scripts pass "4"
            except ValueError:
                raise ConfigError(f"UnifiedConfig.ffn_adapter_scalar must be a number or 'learnable_scalar', "
                                  f"got {self.ffn_adapter_scalar!r}") from None
        if not 0.0 < self.prefix_lr_scale <= 1.0:
            raise ConfigError(f"UnifiedConfig.prefix_lr_scale must be in (0, 1], got {self.prefix_lr_scale}")
        for key in ("attn_bn", "ffn_bn", "mid_dim"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"UnifiedConfig.{key} must be a positive integer, got {getattr(self, key)}")
        if self.attn_mode == "none" and self.ffn_mode == "none":
            raise ConfigError("UnifiedConfig: attn_mode and ffn_mode are both 'none', so the adapter would change nothing")

    @staticmethod
    def _option(axis: str, mode: str, option: Optional[str], options_of_mode: dict) -> Optional[str]:
        allowed = options_of_mode.get(mode, ())
        if option in (None, "none"):
            if allowed:
                return allowed[0]
            return option
        if option not in allowed:
            takes = f"one of {list(allowed)}" if allowed else "no option ('none')"
            raise ConfigError(f"UnifiedConfig: {axis}_option={option!r} conflicts with {axis}_mode={mode!r}, "
                              f"which takes {takes}")
        return option


def components(config: UnifiedConfig, model: nn.Module) -> list[PeftConfig]:
    """The plain method configs whose union this point of the design space is."""
    from .bitfit import BitFitConfig
    from .bottleneck import BottleneckConfig
    from .cross_prefix import CrossPrefixConfig
    from .lora import LoraConfig
    from .prefix import PrefixTuningConfig
    from .prompt import PromptTuningConfig

    common = {"task_type": config.task_type, "inference_mode": config.inference_mode}
    layers = {"layers_to_transform": config.layers_to_transform}
    adapter = {"layernorm_option": config.ffn_adapter_layernorm_option, "init_option": config.ffn_adapter_init_option,
               "scalar": config.ffn_adapter_scalar, **common, **layers}
    lora = {"lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "init_lora_weights": config.lora_init != "bert", **common, **layers}
    parts: list[PeftConfig] = []
    mode, option = config.attn_mode, config.attn_option
    if mode in ("prefix", "prefix_nomlp"):
        if option in ("concat", "cross_attn_noln") and (option == "concat" or config.attn_composition == "gate_add"):
            seq2seq = getattr(model.config, "is_encoder_decoder", False)
            parts.append(PrefixTuningConfig(
                num_virtual_tokens=config.attn_bn, prefix_projection=mode == "prefix", encoder_hidden_size=config.mid_dim,
                prefix_dropout=config.prefix_dropout, projection_lr_scale=config.prefix_lr_scale, **common,
                prefix_sites=("decoder_self", "encoder_self", "cross") if seq2seq else ("decoder_self",)))
        else:
            parts.append(CrossPrefixConfig(
                num_virtual_tokens=config.attn_bn, prefix_form=option, prefix_projection=mode == "prefix",
                encoder_hidden_size=config.mid_dim, prefix_dropout=config.prefix_dropout,
                projection_lr_scale=config.prefix_lr_scale, **common, **layers))
    elif mode == "adapter":
        parts.append(BottleneckConfig(sites=["attention"], adapter_option=option, bottleneck_size=config.attn_bn, **adapter))
    elif mode == "lora":
        parts.append(LoraConfig(r=config.attn_bn, **lora))
    elif mode == "prompt_tuning":
        parts.append(PromptTuningConfig(num_virtual_tokens=config.attn_bn, **common))
    elif mode == "bitfit":
        parts.append(BitFitConfig(**common, **layers))
    if config.ffn_mode == "adapter":
        parts.append(BottleneckConfig(sites=["ffn"], adapter_option=config.ffn_option, bottleneck_size=config.ffn_bn, **adapter))
    elif config.ffn_mode == "lora":
        parts.append(LoraConfig(r=config.ffn_bn, target_modules=ffn_linears(model), **lora))
    return parts


def ffn_linears(model: nn.Module) -> list[str]:
    """Every Linear of every block's FFN: the modules under its input end, and its output projection."""
    from ..engine.targeting import is_linear, logical_modules

    sites = block_sites_of(model, "UnifiedConfig(ffn_mode='lora')")
    roots = []
    for block in block_paths(model):
        roots += [resolve_in_block(model, block, sites.ffn_in), resolve_in_block(model, block, sites.ffn_out)]
    return [name for name, module in logical_modules(model)
            if is_linear(module) and any(name == r or name.startswith(r + ".") for r in roots)]


@dataclass
class MAMConfig(UnifiedConfig):
    """Mix-and-match adapter (He et al., 2022): prefix tuning (l = 30, MLP-reparameterised) at attention plus a
    scaled parallel adapter (r = 512, s = 4) at the FFN. `MAMConfig.for_glue()` gives smaller sizes.

    The learning rate has to shrink as the FFN adapter widens: its up-projection starts at zero, and each Adam
    step moves the adapter's output by about s × lr × the summed |activations| of its r hidden units. He et al.
    train these sizes at 1e-4 (GLUE) and 5e-5 (XSum); on MiniLM, r = hidden/2 = 192 at 1e-3 sat at the label
    prior for a whole 250-step run (seed 0) where r = 64 learns, and 3e-4 (about the r = 64 adapter's step at 1e-3)
    learns (benchmarks/fidelity.py)."""
    attn_mode: Literal["none", "prefix", "prefix_nomlp", "lora", "adapter", "prompt_tuning", "bitfit"] = "prefix"
    attn_option: Optional[Literal["none", "concat", "cross_attn", "cross_attn_noln", "cross_attn_relu", "parallel",
                                  "sequential"]] = "concat"
    attn_bn: int = 30
    ffn_mode: Literal["none", "adapter", "lora"] = "adapter"
    ffn_option: Optional[Literal["parallel", "sequential", "pfeiffer", "none"]] = "parallel"
    ffn_adapter_scalar: Union[float, str] = 4.0
    ffn_bn: int = 512

    @classmethod
    def for_glue(cls, **overrides) -> "MAMConfig":
        """Sizes for GLUE-scale encoders (our choice, not the paper's): l = 16, r = 64."""
        return cls(**{"attn_bn": 16, "ffn_bn": 64, "mid_dim": 256, **overrides})


register_method(MethodSpec("UNIFIED", UnifiedConfig, None, "", components=components))


def _axes(knobs: Knobs) -> dict:
    """The run's design-space axes (--unified-config's, under the flags'), checked by name."""
    axes = {key: value for key, value in (knobs.axes or {}).items() if key != "peft_type"}
    unknown = sorted(set(axes) - set(AXES) - {"task_type", "layers_to_transform"})
    if unknown:
        raise ConfigError(f"unknown design-space axes {unknown}; the axes are {', '.join(AXES)}")
    return {**axes, "task_type": knobs.task_type}


# The GLUE-size variant (prefix l = 16, adapter r = 64) suits a 22M-parameter classifier; flags override it.
register_preset(Preset("mam", 1e-3, lambda k: MAMConfig.for_glue(**_axes(k)),
                       "prefix + scaled parallel adapter, GLUE sizes l = 16, r = 64"))
# a starting point for any point of the design space, not tuned per point
register_preset(Preset("unified", 1e-3, lambda k: UnifiedConfig(**_axes(k)), "any point of the design space"))
