"""`fit` under two processes (torchrun, gloo, CPU) with each engine, against one process with the same global
batch and data order: each process takes every second batch of 4 rows of the same shuffled order, so a step sees
the 8 rows one process sees with batches of 8, and the averaged gradient is that batch's mean gradient.

Tolerances: float32 runs differ from the one-process run only by the order of the gradient reduction (two
half-batch means averaged vs one mean), ~1e-7 relative, grown over 12 AdamW steps: 1e-5 absolute, plus 1e-3
relative: AdamW's step m/sqrt(v) does not shrink with the gradient, so on a weight with tiny, rare gradients
(an embedding row seen once, full fine-tuning) that noise moves it by ~2e-5 (~3e-4 relative). That is far below
what a wrong order, schedule or averaging changes (the DeepSpeed schedule bug this caught moved weights by ~1e-2).
Mixed precision (bf16 autocast) rounds each matmul to 8 bits of mantissa on batches of 4 vs 8 rows, and AdamW
turns the rounding noise of tiny gradients into full-size steps (a zero-initialised up-projection, P-tuning's
MLP: up to 40% of an update on single coordinates), so weights cannot be compared coordinate by coordinate.
A bf16 cell is compared by what training did instead: each tensor's update (trained minus initial), and the
change of the held-out logits, within half of the one-process run's (norms; the fp32 cells check the reduction
itself). Full fine-tuning in bf16 is compared by shape only (rarely seen embedding rows move by ~0.1).
The attention key biases are never compared: their true gradient is zero (a shift of every key by the same
vector leaves each softmax unchanged), so AdamW moves them by normalised rounding noise alone, which differs
between any two reduction orders.
"""
import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

import unipeft
from unipeft.engine.layers import AdapterError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "distributed"))
import matrix  # noqa: E402

from unipeft.engine.sharding import whole_parameters  # noqa: E402
from unipeft.train.train_state import cpu_copy  # noqa: E402
from unipeft.train.trainer import fit  # noqa: E402

FP32 = (1e-5, 1e-3)  # (absolute, relative)
LOW_PRECISION_UPDATE = 0.5
KEY_BIAS = re.compile(r"attention\.self\.key\..*bias")


@functools.lru_cache(maxsize=None)
def reference(method: str, precision_engine: str, root: str) -> str:
    """The one-process run (batches of 8), saved like the launch script saves; its folder. initial/ holds the
    untrained model saved the same way, and initial.safetensors its trainable tensors."""
    out = os.path.join(root, f"reference-{precision_engine}", method)
    model = matrix.model_for(method)
    model.save_pretrained(os.path.join(out, "initial"))
    save_file(cpu_copy(model), os.path.join(out, "initial.safetensors"))
    fit(model, matrix.TRAIN, matrix.collate, lambda: {"loss": matrix.held_out_loss(model)}, "loss", False,
        matrix.options(precision_engine, processes=1), os.path.join(out, "run"), log=lambda _: None)
    with whole_parameters(model, trainable_only=True):
        model.save_pretrained(out)
    return out


def weights(folder: str, method: str) -> dict:
    """The saved adapter's tensors; for full, the saved model's parameters as loaded (transformers may rename
    keys when it saves a model it loaded: LayerNorm weight/bias as gamma/beta)."""
    if method == "full":
        return {k: p.detach() for k, p in BertForSequenceClassification.from_pretrained(folder).named_parameters()}
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def reloaded(folder: str, method: str):
    """The saved run loaded into a fresh BERT of the same seed."""
    if method == "full":
        return BertForSequenceClassification.from_pretrained(folder)
    return unipeft.PeftModel.from_pretrained(matrix.model_for("full"), folder)


def assert_same(ours: dict, theirs: dict, initial: dict | None, low_precision: bool, what: str) -> None:
    """Same names and whole shapes; values as the module docstring says (low precision without the initial
    tensors: shapes only)."""
    assert ours.keys() == theirs.keys(), what
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape and tensor.numel() > 0, f"{what}: {name} {tuple(tensor.shape)}"
        if KEY_BIAS.search(name) or low_precision and (initial is None or initial[name].shape != tensor.shape):
            continue  # (AdaLoRA saves its kept ranks alone: its checkpoint's whole tensors are compared)
        if not low_precision:
            torch.testing.assert_close(tensor, theirs[name], atol=FP32[0], rtol=FP32[1],
                                       msg=lambda m: f"{what}: {name}: {m}")
            continue
        gap, update = (tensor - theirs[name]).norm(), (theirs[name] - initial[name]).norm()
        assert gap <= LOW_PRECISION_UPDATE * update + 1e-6, f"{what}: {name}: {gap:.2e} from an update of {update:.2e}"


def same_function(logits: list, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(torch.tensor(logits), expected, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def launch(engine: str, out: str) -> str:
    """Train every method under `engine` in one launch; "" or what went wrong (the launch ends at a method that
    fails: its traceback, and the methods after it have no result)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HANG_SECONDS="150")
    if matrix.DEVICE == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(matrix.PROCESSES),
               "--standalone", os.path.join(HERE, "distributed", "train_methods.py"), engine, out,
               *matrix.METHODS]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    errors = [open(os.path.join(out, m, name)).read() for m in matrix.METHODS if os.path.isdir(os.path.join(out, m))
              for name in os.listdir(os.path.join(out, m)) if name.startswith("error_")]
    if done.returncode == 0 and not errors:
        return ""
    return f"{engine} launch failed (exit {done.returncode}):\n" + "\n".join(errors) + done.stderr[-3000:]


def check_cell(engine: str, method: str, out: str, root: str) -> None:
    """One cell of the matrix: 12 steps taken, the held-out loss fell, the parameters were partitioned where
    the engine partitions them, the saved adapter, the checkpoint and the best copy equal the one-process
    run's, and the saved adapter loads back into a fresh model that computes the trained model's logits."""
    result_file = os.path.join(out, method, "result.json")
    assert os.path.exists(result_file), f"{method}: no result (the launch ended before it)"
    with open(result_file) as fh:
        result = json.load(fh)
    assert result["steps"] == 12, method
    assert result["after"] < result["before"], f"{method}: held-out loss did not decrease: {result}"
    if engine in ("fsdp", "zero3"):  # the parameters were shards: gathering them was needed
        assert result["partitioned"], method
    low_precision = engine in matrix.PRECISION
    expected = reference(method, engine if low_precision else "ddp", root)
    shape_only = low_precision and method == "full"
    assert_same(weights(os.path.join(out, method), method), weights(expected, method),
                None if shape_only else weights(os.path.join(expected, "initial"), method), low_precision,
                f"{method} saved")
    for name in ("trainable.safetensors", "best.safetensors"):  # the checkpoint's whole tensors
        assert_same(load_file(os.path.join(out, method, "run", "checkpoint", name)),
                    load_file(os.path.join(expected, "run", "checkpoint", name)),
                    None if shape_only else load_file(os.path.join(expected, "initial.safetensors")), low_precision,
                    f"{method} {name}")
    # optimizer state for the trainable parameters alone (FSDP keys it by name, DDP by position)
    trained = set(load_file(os.path.join(out, method, "run", "checkpoint", "trainable.safetensors")))
    optimizer = torch.load(os.path.join(out, method, "run", "checkpoint", "optimizer.pt"), weights_only=True)
    if engine == "fsdp":
        assert set(optimizer["state"]) == trained, f"{method}: FSDP optimizer state for {set(optimizer['state']) ^ trained}"
    elif engine.startswith("zero"):
        assert {name.split(".", 1)[1] for name in optimizer["tensors"]} == trained, method
    else:
        assert len(optimizer["state"]) == len(trained), method
    initial = load_file(os.path.join(out, method, "initial.safetensors"))  # created on the engine's base
    assert_same(initial, load_file(os.path.join(expected, "initial.safetensors")), {}, False, f"{method} created")
    logits = matrix.held_out(reloaded(os.path.join(out, method), method)).logits
    same_function(result["logits"], logits, f"{method} reloaded")
    if engine in ("zero3", "fsdp") and method != "full":  # also loaded into a partitioned base
        same_function(result["loaded_logits"], logits, f"{method} loaded under {engine}")
    if method != "full":
        try:
            reloaded(expected, method).merge_and_unload()
            mergeable = True
        except AdapterError:
            mergeable = False
        assert result["merged"] == mergeable, f"{method}: merged under {engine}: {result['merged']}"
        if mergeable:
            merged = matrix.base_model()
            keys = merged.load_state_dict(load_file(os.path.join(out, method, "merged.safetensors")), strict=False)
            assert keys.missing_keys == keys.unexpected_keys == [], f"{method} merged: {keys}"
            same_function(result["logits"], matrix.held_out(merged).logits, f"{method} merged under {engine}")
    if low_precision and not shape_only:  # what training did to the held-out logits, within the same margin
        theirs = matrix.held_out(reloaded(expected, method)).logits
        change = (theirs - matrix.held_out(reloaded(os.path.join(expected, "initial"), method)).logits).norm()
        gap = (logits - theirs).norm()
        assert gap <= LOW_PRECISION_UPDATE * change, f"{method} vs one process: logits {gap:.2e} apart, moved {change:.2e}"


@pytest.mark.parametrize("engine", list(matrix.ENGINES))
def test_engine_trains_every_method_like_one_process(tmp_path_factory, engine):
    root = str(tmp_path_factory.getbasetemp())
    out = os.path.join(root, engine)
    launch_error = launch(engine, out)
    failures = {}
    for method in matrix.METHODS:
        try:
            check_cell(engine, method, out, root)
        except Exception as exc:  # noqa: BLE001 - every cell is checked and reported
            failures[method] = f"{type(exc).__name__}: {exc}"
    if os.environ.get("UNIPEFT_RECORD_ENGINE_MATRIX") == "1":
        matrix.record(engine, set(failures))
    assert not failures, (f"{engine}: {len(failures)} of {len(matrix.METHODS)} methods failed: {sorted(failures)}\n"
                          + launch_error + "\n\n".join(f"{m}: {e[:1500]}" for m, e in failures.items()))


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]


@pytest.mark.parametrize("launcher, engine_args, engine", [
    (TORCHRUN, ["--engine", "configs/deepspeed/zero3.json"], "deepspeed"),
    (TORCHRUN, ["--engine", "fsdp"], "fsdp"),
    (ACCELERATE + ["configs/accelerate/fsdp.yaml"], [], "fsdp"),  # the engine from accelerate's settings
    (ACCELERATE + ["configs/accelerate/ddp.yaml"], ["--engine", "configs/deepspeed/zero2.json"], "deepspeed"),
], ids=["torchrun-zero3", "torchrun-fsdp", "accelerate-fsdp", "accelerate-zero2"])
def test_unipeft_train_under_a_launcher_saves_a_run_that_one_process_reproduces(launcher, engine_args, engine,
                                                                                 tmp_path, capsys):
    """The command line end to end: `torchrun -m unipeft train --engine ...` or `accelerate launch --config_file
    configs/accelerate/... -m unipeft train` on 2 processes writes one run folder (the main process alone), whose
    adapter `unipeft test` (one process) scores exactly as metrics.json says."""
    import workflow_models as W
    from unipeft.cli import main

    bert = W.tiny_bert(tmp_path / "bert")
    data = W.write_csv(tmp_path / "reviews.csv", ["text", "label"], W.sentiment_rows(160, noise=0.1))
    out = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [*launcher, "-m", "unipeft", "train", "--model", bert, "--data", data, "--epochs", "2",
               "--batch-size", "8", "--max-length", "16", "--lr", "0.01", "--no-progress", *engine_args,
               "--output-dir", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 16  # 128 training rows, 8 a process and step: 8 steps an epoch
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert (state["engine"], state["num_processes"]) == (engine, 2)
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(t.numel() > 0 for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) == metrics["trainable_params"]
    # counted on the partitioned (ZeRO-3) or meta (FSDP) base: the base, plus the adapter, the trained head
    # copy standing in for the frozen original
    base = BertForSequenceClassification.from_pretrained(bert, num_labels=2)
    head = sum(p.numel() for p in base.classifier.parameters())
    assert metrics["total_params"] == sum(p.numel() for p in base.parameters()) + metrics["trainable_params"] - head
    assert done.stdout.count("test: accuracy") == 1  # one process reports
    capsys.readouterr()
    assert main(["test", "--checkpoint", str(out), "--device", "cpu"]) == 0
    assert f"accuracy {metrics['test']['accuracy']:.4f} over {metrics['num_test']} examples" in capsys.readouterr().out


def test_a_fit_after_a_deepspeed_fit_in_the_same_process_trains_without_deepspeed(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               os.path.join(HERE, "distributed", "fit_after_deepspeed.py"), str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == ["deepspeed deepspeed", "after ddp"]


RESUMED_METHODS = ("lora", "adalora", "full")  # plain, with step state (AdaLoRA's scores), every weight


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2", "zero3"])
def test_resume_under_an_engine_continues_exactly(tmp_path, engine):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(HERE, "distributed", "resume.py"), engine, str(tmp_path), *RESUMED_METHODS]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for method in RESUMED_METHODS:
        for straight_file, resumed_file in (("straight.safetensors", "resumed.safetensors"),  # best, reloaded
                                            ("straight/checkpoint/trainable.safetensors",  # the last step's
                                             "interrupted/checkpoint/trainable.safetensors")):
            straight = load_file(tmp_path / method / straight_file)
            resumed = load_file(tmp_path / method / resumed_file)
            assert straight.keys() == resumed.keys()
            for name, tensor in straight.items():
                assert torch.equal(tensor, resumed[name]), f"{engine} {method} {resumed_file}: {name}"
