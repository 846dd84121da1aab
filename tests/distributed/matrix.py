"""What tests/test_distributed.py trains under each engine and, in one process, as the reference: a tiny BERT
(hidden 32, 2 layers, no dropout), every method of `unipeft train --method` built as the command line builds it
(small sizes, no dropout: the runs must be comparable), random token data, and the loop's options.

The README's engine matrix is rendered from benchmarks/results/engine_matrix/<column>.json, which
tests/test_distributed.py writes when UNIPEFT_RECORD_ENGINE_MATRIX=1 (scripts/engine_matrix.sh): each cell
passed or failed, with the date and the device of the run. The CPU columns run on every CI run too; fp16 needs
a GPU (UNIPEFT_ENGINE_DEVICE=cuda, which the script sets when it finds one)."""
import datetime
import json
import os
import platform

import torch
from transformers import BertConfig, BertForSequenceClassification

import unipeft
from unipeft.registry import Knobs
from unipeft.train.methods import method_presets
from unipeft.train.loop_options import LoopOptions

DEVICE = os.environ.get("UNIPEFT_ENGINE_DEVICE", "cpu")
CPU_ENGINES = {"ddp": "ddp", "bf16": "ddp", "fsdp": "fsdp", "zero1": "configs/deepspeed/zero1.json",
               "zero2": "configs/deepspeed/zero2.json", "zero3": "configs/deepspeed/zero3.json"}
GPU_ENGINES = {"fp16": "ddp"}
COLUMNS = {"ddp": "DDP", "bf16": "bf16", "fsdp": "FSDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3",
           "fp16": "fp16 (GPU)"}
PRECISION = {"bf16": "bf16", "fp16": "fp16"}  # the others train in float32
METHODS = tuple(method_presets())
PER_PROCESS_BATCH = 4
PROCESSES = 2 if DEVICE == "cpu" else max(1, min(2, torch.cuda.device_count()))  # one GPU a process
# On one GPU a launch is a single process: only the GPU columns (precision, not sharding) mean anything there.
ENGINES = CPU_ENGINES if DEVICE == "cpu" else {**(CPU_ENGINES if PROCESSES > 1 else {}), **GPU_ENGINES}
BASE_CONFIG = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                         vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
UNIFIED_POINT = {"attn_mode": "lora", "ffn_mode": "adapter", "ffn_option": "sequential"}  # `unified` trains this


def base_model():
    """The tiny BERT every cell starts from (seeded)."""
    torch.manual_seed(0)
    return BertForSequenceClassification(BASE_CONFIG)


def adapt(bert, method: str):
    """`method` on `bert`, built as the command line builds it and seeded on its own, so the adapter starts the
    same whether the base was built whole, on the meta device or partitioned by ZeRO-3; full: the BERT itself."""
    if method == "full":
        return bert.requires_grad_(True)
    config = method_presets()[method].build(Knobs(
        task_type="SEQ_CLS", r=4, alpha=8, dropout=0.0, num_virtual_tokens=4, bottleneck_size=8, total_steps=12,
        axes={"attn_bn": 4, "ffn_bn": 8, "mid_dim": 16, **(UNIFIED_POINT if method == "unified" else {})}))
    if method == "oft":
        config.oft_block_size = 8  # 4 rotations a layer on 32 features
    if hasattr(config, "generator_dropout"):  # idpg, pg
        config.generator_hidden_size, config.generator_dropout = 16, 0.0
    torch.manual_seed(1)
    return unipeft.get_peft_model(bert, config)


def model_for(method: str):
    """The model to train, seeded: a PEFT model, or the BERT itself for full fine-tuning."""
    return adapt(base_model(), method)


def examples(n: int, seed: int):
    """Random token ids; the label is whether the second token is in the upper half of the vocabulary."""
    ids = torch.randint(5, 100, (n, 8), generator=torch.Generator().manual_seed(seed))
    labels = (ids[:, 1] >= 52).long()
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


TRAIN, HELD_OUT = examples(32, seed=1), examples(16, seed=2)  # 32 rows: 4 global batches of 8, none padded


def collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in ("input_ids", "labels")}


def held_out(model):
    """The model's output on the held-out rows (in eval mode, without gradients)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # the GPU columns train on cuda
    with torch.no_grad():
        outputs = model(**{key: value.to(device) for key, value in collate(HELD_OUT).items()})
    model.train(was_training)
    return outputs


def held_out_loss(model) -> float:
    return held_out(model).loss.item()


def options(engine: str, processes: int) -> LoopOptions:
    """3 epochs of 4 optimizer steps of 8 rows, an evaluation every 3 steps (the best copy is tracked and
    reloaded); `engine` under several processes, the plain loop in one (the reference)."""
    return LoopOptions(epochs=3, batch_size=PER_PROCESS_BATCH * PROCESSES // processes, lr=2e-2, eval_every=3,
                       log_every=1, device=DEVICE, progress=False, engine=ENGINES[engine] if processes > 1 else None,
                       mixed_precision=PRECISION.get(engine, "no"))


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks", "results",
                       "engine_matrix")


def device_name() -> str:
    if DEVICE == "cuda":
        return f"{torch.cuda.get_device_name()} ×{PROCESSES}"
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor() or "CPU") if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{model}, {PROCESSES} CPU processes (gloo)"


def record(engine: str, failed: set[str]) -> None:
    """Write the column's result file (benchmarks/results/engine_matrix/<engine>.json)."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{engine}.json"), "w", encoding="utf-8") as fh:
        json.dump({"date": datetime.date.today().isoformat(), "device": device_name(),
                   "cells": {m: "failed" if m in failed else "passed" for m in METHODS}}, fh, indent=1)
        fh.write("\n")


def recorded() -> dict[str, dict]:
    """The result files there are, by column."""
    return {engine: json.load(open(os.path.join(RESULTS, f"{engine}.json"), encoding="utf-8"))
            for engine in COLUMNS if os.path.exists(os.path.join(RESULTS, f"{engine}.json"))}


def render() -> str:
    """The README's engine matrix: a row a method, a column an engine; each cell passed, failed or not run;
    under it the date and device of each column's last run."""
    results = recorded()
    lines = ["| method | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for method in METHODS:
        cells = [results[e]["cells"].get(method, "not run") if e in results else "not run" for e in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    runs: dict[str, list[str]] = {}
    for engine, title in COLUMNS.items():
        run = f"{results[engine]['date']} on {results[engine]['device']}" if engine in results else "never run"
        runs.setdefault(run, []).append(title)
    lines += ["", "Last runs: " + "; ".join(f"{', '.join(titles)}: {run}" for run, titles in runs.items()) + "."]
    return "\n".join(lines) + "\n"
