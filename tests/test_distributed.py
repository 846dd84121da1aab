"""`fit` under two processes (torchrun, gloo, CPU) with each engine, against one process with the same global
batch and data order: each process takes every second batch of 4 rows of the same shuffled order, so a step sees
the 8 rows one process sees with batches of 8, and the averaged gradient is that batch's mean gradient.

Tolerances: float32 runs differ from the one-process run only by the order of the gradient reduction (two
half-batch means averaged vs one mean), ~1e-7 relative, grown over 12 AdamW steps: 1e-5 absolute, plus 1e-3
relative: AdamW's step m/sqrt(v) does not shrink with the gradient, so on a weight with tiny, rare gradients
(an embedding row seen once, full fine-tuning) that noise moves it by ~2e-5 (~3e-4 relative). bf16 autocast rounds
each matmul to 8 bits of mantissa (~4e-3 relative) on batches of 4 vs 8 rows, so the same steps can round
differently: 2e-3 absolute on weights of size ~0.02-0.1 (a few bf16 ulps), still far below what a wrong
order, schedule or averaging changes (the DeepSpeed schedule bug this caught moved them by ~1e-2).
Full fine-tuning in bf16 is compared by shape only: bf16 gradients of rarely seen embedding rows, fed to AdamW,
move them by up to ~0.1 between the two runs. The attention key biases are never compared: their true gradient
is zero (a shift of every key by the same vector leaves each softmax unchanged), so AdamW moves them by
normalised rounding noise alone, which differs between any two reduction orders.
"""
import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForSequenceClassification

import unipeft

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "distributed"))
import matrix  # noqa: E402

FP32 = (1e-5, 1e-3)
from unipeft.train.engines import gathered  # noqa: E402
from unipeft.train.trainer import fit  # noqa: E402

TOLERANCE = {"bf16": (2e-3, 1e-3)}  # (absolute, relative); the others FP32


@functools.lru_cache(maxsize=None)
def reference(method: str, precision_engine: str, root: str) -> str:
    """The one-process run (batches of 8), saved like the launch script saves; its folder."""
    out = os.path.join(root, f"reference-{precision_engine}", method)
    model = matrix.model_for(method)
    fit(model, matrix.TRAIN, matrix.collate, lambda: {"loss": matrix.held_out_loss(model)}, "loss", False,
        matrix.options(precision_engine, processes=1), os.path.join(out, "run"), log=lambda _: None)
    with gathered(model):
        model.save_pretrained(out)
    return out


def weights(folder: str, method: str) -> dict:
    return load_file(os.path.join(folder, "model.safetensors" if method == "full" else "adapter_model.safetensors"))


def assert_same(ours: dict, theirs: dict, tolerance: tuple | None, what: str) -> None:
    """Same names and whole shapes; values within (atol, rtol) unless tolerance is None."""
    assert ours.keys() == theirs.keys(), what
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape and tensor.numel() > 0, f"{what}: {name} {tuple(tensor.shape)}"
        if tolerance is None or name.endswith("attention.self.key.bias"):
            continue
        atol, rtol = tolerance
        torch.testing.assert_close(tensor, theirs[name], atol=atol, rtol=rtol, msg=lambda m: f"{what}: {name}: {m}")


def launch(engine: str, out: str) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HANG_SECONDS="150")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(matrix.PROCESSES),
               "--standalone", os.path.join(HERE, "distributed", "train_methods.py"), engine, out,
               *matrix.METHODS]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    errors = [open(os.path.join(out, m, name)).read() for m in matrix.METHODS if os.path.isdir(os.path.join(out, m))
              for name in os.listdir(os.path.join(out, m)) if name.startswith("error_")]
    assert done.returncode == 0 and not errors, (
        f"{engine} failed on CPU (exit {done.returncode}):\n" + "\n".join(errors) + done.stderr[-3000:])


@pytest.mark.parametrize("engine", list(matrix.ENGINES))
def test_engine_trains_like_one_process(tmp_path_factory, engine):
    root = str(tmp_path_factory.getbasetemp())
    out = os.path.join(root, engine)
    launch(engine, out)
    for method in matrix.METHODS:
        with open(os.path.join(out, method, "result.json")) as fh:
            result = json.load(fh)
        assert result["steps"] == 12, method
        assert result["after"] < result["before"], f"{method}: held-out loss did not decrease: {result}"
        if engine in ("fsdp", "zero3"):  # the parameters were shards: gathering them was needed
            assert result["partitioned"], method
        expected = reference(method, "bf16" if engine == "bf16" else "ddp", root)
        tolerance = None if engine == "bf16" and method == "full" else TOLERANCE.get(engine, FP32)
        assert_same(weights(os.path.join(out, method), method), weights(expected, method), tolerance, f"{method} saved")
        for name in ("trainable.safetensors", "best.safetensors"):  # the checkpoint's whole tensors
            assert_same(load_file(os.path.join(out, method, "run", "checkpoint", name)),
                        load_file(os.path.join(expected, "run", "checkpoint", name)), tolerance, f"{method} {name}")

        base = matrix.model_for("full")  # a fresh BERT of the same seed
        reloaded = (BertForSequenceClassification.from_pretrained(os.path.join(out, method)) if method == "full"
                    else unipeft.PeftModel.from_pretrained(base, os.path.join(out, method)))
        reloaded.eval()
        with torch.no_grad():
            logits = reloaded(**matrix.collate(matrix.HELD_OUT)).logits
        assert torch.isfinite(logits).all() and logits.shape == (len(matrix.HELD_OUT), 2), method
        assert math.isclose(matrix.held_out_loss(reloaded), result["after"], rel_tol=1e-4, abs_tol=5e-4), method


@pytest.mark.parametrize("engine", ["configs/deepspeed/zero3.json", "fsdp"])
def test_unipeft_train_under_torchrun_saves_a_run_that_one_process_reproduces(engine, tmp_path, capsys):
    """The command line end to end: `torchrun -m unipeft train --engine ...` on 2 processes writes one run folder
    (the main process alone), whose adapter `unipeft test` (one process) scores exactly as metrics.json says."""
    import workflow_models as W
    from unipeft.cli import main

    bert = W.tiny_bert(tmp_path / "bert")
    data = W.write_csv(tmp_path / "reviews.csv", ["text", "label"], W.sentiment_rows(160, noise=0.1))
    out = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "unipeft",
               "train", "--model", bert, "--data", data, "--epochs", "2", "--batch-size", "8", "--max-length", "16",
               "--lr", "0.01", "--no-progress", "--engine", engine, "--output-dir", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 16  # 128 training rows, 8 a process and step: 8 steps an epoch
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(t.numel() > 0 for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) == metrics["trainable_params"]
    assert done.stdout.count("test: accuracy") == 1  # one process reports
    capsys.readouterr()
    assert main(["test", "--checkpoint", str(out), "--device", "cpu"]) == 0
    assert f"accuracy {metrics['test']['accuracy']:.4f} over {metrics['num_test']} examples" in capsys.readouterr().out
