"""`unipeft train --method` presets, as the registry holds them: every preset builds an adapter that attaches to
a BERT, and the run's log line says where it went."""
from __future__ import annotations

import pytest

import families as F
from unipeft import get_peft_model
from unipeft.registry import Knobs
from unipeft.train.methods import method_presets

ADAPTER_PRESETS = [name for name in method_presets() if name != "full"]
# what each run's log says the adapter is attached to (the family's default targets, the presets' sizes)
WHERE = {
    "lora": "target modules: query, value",
    "prompt": "20 virtual tokens",
    "idpg": "20 virtual tokens, sentence encoder: the model itself",
    "pg": "20 virtual tokens, sentence encoder: the model itself with a learned encoder prompt",
    "houlsby": "sequential adapter at attention and ffn, bottleneck 64",
    "parallel": "parallel adapter at ffn, bottleneck 64",
    "mam": "attn_mode=prefix, attn_option=concat, attn_bn=16, ffn_mode=adapter, ffn_option=parallel, ffn_bn=64",
}


@pytest.mark.parametrize("name", ADAPTER_PRESETS)
def test_every_preset_attaches_and_describes_where(name):
    preset = method_presets()[name]
    axes = {"attn_mode": "lora", "ffn_mode": "adapter"} if name == "unified" else None  # unified has no default point
    config = preset.build(Knobs(task_type="SEQ_CLS", total_steps=10, axes=axes))
    model = get_peft_model(F.make_model("bert", "SEQ_CLS"), config)
    assert model.num_parameters(only_trainable=True) > 0 and 0 < preset.lr < 1
    described = model.active_peft_config.describe()
    if name in WHERE:
        assert described == WHERE[name]
    else:
        assert described and described != type(config).__name__, f"{name}: say where the adapter went"


def test_full_fine_tuning_builds_no_adapter():
    assert method_presets()["full"].build(Knobs()) is None and list(method_presets())[0] == "full"


def test_preset_order_is_the_registry_order_whatever_was_imported_first():
    """The README's option rows list the presets in order: importing a method module early must not move it."""
    import subprocess
    import sys

    code = ("import unipeft.methods.ia3, unipeft.methods.adalora; from unipeft.registry import presets; "
            "print(','.join(presets()))")
    early = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert early.split(",") == [name for name in method_presets() if name != "full"]
    assert early.split(",").index("ia3") > early.split(",").index("lora")


def test_design_space_presets_refuse_an_unknown_axis_by_name():
    from unipeft import ConfigError

    for name in ("mam", "unified"):
        with pytest.raises(ConfigError, match=r"unknown design-space axes \['attn_size'\]; the axes are attn_mode"):
            method_presets()[name].build(Knobs(task_type="SEQ_CLS", axes={"attn_mode": "lora", "attn_size": 4}))
