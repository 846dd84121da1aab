"""`unipeft train` with the bottleneck presets, MAM, IA3, BitFit and any point of the design space."""
from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from unipeft.cli import main
from unipeft.train.methods import default_lr

ARGS = ["--epochs", "2", "--batch-size", "16", "--max-length", "16", "--seed", "1", "--no-progress"]


def train(tiny_model, tiny_csv, out, *args) -> dict:  # noqa: F811
    code = main(["train", "--model", tiny_model, "--data", tiny_csv, "--output-dir", str(out), *ARGS, *args])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("method,args,expected", [
    ("houlsby", ["--bottleneck-size", "8"],
     {"peft_type": "BOTTLENECK", "sites": ["attention", "ffn"], "adapter_option": "sequential", "bottleneck_size": 8}),
    ("pfeiffer", [], {"peft_type": "BOTTLENECK", "sites": ["ffn"], "adapter_option": "pfeiffer", "bottleneck_size": 64}),
    ("parallel", [], {"peft_type": "BOTTLENECK", "adapter_option": "parallel", "scalar": 1.0}),
    ("scaled_parallel", [], {"peft_type": "BOTTLENECK", "adapter_option": "parallel", "scalar": 4.0}),
    ("mam", ["--ffn-bn", "8"], {"peft_type": "UNIFIED", "attn_mode": "prefix", "attn_option": "concat", "attn_bn": 16,
                                "ffn_mode": "adapter", "ffn_option": "parallel", "ffn_bn": 8, "ffn_adapter_scalar": 4.0}),
    ("ia3", [], {"peft_type": "IA3", "target_modules": ["key", "value", "output.dense"],
                 "feedforward_modules": ["output.dense"]}),
    ("bitfit", [], {"peft_type": "BITFIT", "bias_groups": "all"}),
    ("loha", ["--r", "4"], {"peft_type": "LOHA", "r": 4, "alpha": 16.0, "target_modules": ["query", "value"]}),
    ("dora", ["--r", "4"], {"peft_type": "LORA", "use_dora": True, "r": 4, "target_modules": ["query", "value"]}),
    ("lokr", ["--r", "4"], {"peft_type": "LOKR", "r": 4, "alpha": 16.0, "target_modules": ["query", "value"]}),
    ("oft", [], {"peft_type": "OFT", "r": 0, "oft_block_size": 32, "target_modules": ["query", "value"]}),
    ("adalora", ["--r", "4"], {"peft_type": "ADALORA", "target_r": 4, "init_r": 6, "target_modules": ["query", "value"]}),
    ("unified", ["--attn-mode", "lora", "--attn-bn", "4", "--ffn-mode", "adapter", "--ffn-option", "pfeiffer", "--ffn-bn", "8"],
     {"peft_type": "UNIFIED", "attn_mode": "lora", "attn_bn": 4, "ffn_mode": "adapter", "ffn_option": "pfeiffer"}),
])
def test_method_trains_and_saves_its_config(method, args, expected, tmp_path, tiny_model, tiny_csv):  # noqa: F811
    out = tmp_path / "adapter"
    metrics = train(tiny_model, tiny_csv, out, "--method", method, *args)
    config = json.loads((out / "adapter_config.json").read_text())
    assert {k: config[k] for k in expected} == expected
    assert metrics["method"] == method and metrics["lr"] == default_lr(method)
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    assert metrics["trainable_params"] == sum(t.numel() for t in load_file(out / "adapter_model.safetensors").values()) \
        or method in ("mam", "adalora")  # MAM's prefix MLP folds into the prefix; AdaLoRA saves the kept ranks


def test_adalora_runs_its_rank_schedule_inside_unipeft_train(tmp_path, tiny_model, tiny_csv):  # noqa: F811
    out = tmp_path / "adapter"
    metrics = train(tiny_model, tiny_csv, out, "--method", "adalora", "--r", "2")
    config = json.loads((out / "adapter_config.json").read_text())
    steps = 2 * math.ceil(metrics["num_train"] / 16)  # --epochs 2 --batch-size 16
    assert (config["total_step"], config["tinit"], config["tfinal"]) == (steps, steps // 10, steps // 5)
    pattern = config["rank_pattern"]
    tensors = load_file(out / "adapter_model.safetensors")
    assert len(pattern) == 4 and all(len(kept) == 3 for kept in pattern.values())  # 2 layers × query, value; init_r 3
    assert sum(sum(kept) for kept in pattern.values()) == 2 * len(pattern)  # the budget ends at target_r per module
    for key, kept in pattern.items():
        assert tensors[f"base_model.model.{key.removesuffix('.lora_E')}.lora_A"].shape[0] == sum(kept)


def test_unified_reads_a_json_file_and_flags_override_it(tmp_path, tiny_model, tiny_csv):  # noqa: F811
    spec = tmp_path / "point.json"
    spec.write_text(json.dumps({"attn_mode": "prefix_nomlp", "attn_option": "cross_attn_relu", "attn_bn": 4,
                                "ffn_mode": "adapter", "ffn_bn": 32}))
    out = tmp_path / "adapter"
    train(tiny_model, tiny_csv, out, "--method", "unified", "--unified-config", str(spec), "--ffn-bn", "8")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["attn_option"], config["attn_bn"], config["ffn_option"], config["ffn_bn"]) == \
        ("cross_attn_relu", 4, "parallel", 8)


@pytest.mark.parametrize("args,message", [
    (["--attn-mode", "adapter", "--attn-option", "concat"], "attn_option='concat' conflicts with attn_mode='adapter'"),
    ([], "both 'none'"),
    (["--unified-config", "missing.json"], "cannot read --unified-config"),
])
def test_unified_bad_points_exit_2_naming_the_conflict(args, message, tmp_path, tiny_model, tiny_csv, capsys):  # noqa: F811
    code = main(["train", "--model", tiny_model, "--data", tiny_csv, "--output-dir", str(tmp_path / "o"),
                 "--method", "unified", *ARGS, *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
