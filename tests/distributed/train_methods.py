"""One launch of tests/test_distributed.py: train each method in turn under one engine, save it gathered.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/distributed/train_methods.py \
        ENGINE OUT_DIR METHOD [METHOD ...]

The base BERT is built as large models are under each engine: ZeRO-3 loads it with `from_pretrained` already
partitioned (deepspeed.zero.Init: every weight shape [0] from the start), FSDP builds it on the meta device in
every process but the first; the adapter is then created on that base.

Per method, OUT_DIR/METHOD/ gets initial.safetensors (the trainable tensors as created, gathered), the saved
adapter (save_pretrained; the whole model for full), the run folder (run/: log.jsonl, checkpoint/) and
result.json: held-out loss before and after (the main process's), the held-out logits
after, whether some trainable parameter was partitioned during training (ZeRO-3: numel 0; FSDP: a DTensor
shard), whether the adapter merged (`merge_and_unload()` under the engine; the merged weights, gathered, in
merged.safetensors) and, under ZeRO-3 and FSDP, the held-out logits of the saved adapter loaded into a fresh
partitioned base (ZeRO-3: loaded partitioned; FSDP: built as above and sharded).
A method that fails writes its traceback to OUT_DIR/METHOD/error_<rank>.txt and ends the launch.
"""
import faulthandler
import json
import os
import sys
import traceback

import torch
from accelerate.state import PartialState
from safetensors.torch import save_file
from transformers import BertForSequenceClassification

import matrix
import unipeft
from unipeft.engine.layers import AdapterError
from unipeft.engine.sharding import whole_parameters
from unipeft.train.engines import full_trainable, partitioned_loading, resolve_engine, shard_fsdp
from unipeft.train.plan import is_main_process
from unipeft.train.trainer import fit


def partitioned(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(p.numel() == 0 or isinstance(p, DTensor) and p.to_local().shape != p.shape
               for p in model.parameters() if p.requires_grad)


def zero3_config(out: str) -> str:
    """The shipped ZeRO-3 config, partitioning every parameter however small (it keeps small ones whole)."""
    with open(matrix.ENGINES["zero3"]) as fh:
        config = json.load(fh)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = os.path.join(out, f"zero3_{os.environ['RANK']}.json")  # a file a process: none reads while another writes
    with open(path, "w") as fh:
        json.dump(config, fh)
    return path


def base_for(engine: str, engine_option: str, out: str):
    """The tiny BERT, built as the engine builds large models (see the module docstring)."""
    if engine == "zero3":
        with partitioned_loading(resolve_engine(engine_option)):
            bert = BertForSequenceClassification.from_pretrained(os.path.join(out, "..", "base"))
        assert all(p.numel() == 0 for p in bert.parameters()), "the base was not partitioned at load"
        return bert
    if engine == "fsdp" and int(os.environ["RANK"]) != 0:
        with torch.device("meta"):
            return BertForSequenceClassification(matrix.BASE_CONFIG)
    return matrix.base_model()


def merge_and_save(model, method: str, out: str) -> bool:
    """merge_and_unload() under the engine, then the merged BERT gathered into OUT/merged.safetensors; False
    where the method cannot merge."""
    if method == "full":
        return False
    try:
        merged = model.merge_and_unload()
    except AdapterError:  # bottleneck adapters and prompts change no weight
        return False
    with whole_parameters(merged):
        tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in merged.named_parameters()}
    if is_main_process():
        save_file(tensors, os.path.join(out, "merged.safetensors"))
    return True


def train(engine: str, out: str) -> dict:
    method = os.path.basename(out)
    options = matrix.options(engine, int(os.environ["WORLD_SIZE"]))
    os.makedirs(out, exist_ok=True)
    if engine == "zero3":
        options.engine = zero3_config(out)
    model = matrix.adapt(base_for(engine, options.engine, out), method)
    on_meta = any(p.is_meta for p in model.parameters())
    initial = None if on_meta else full_trainable(model)
    if is_main_process():
        save_file(initial, os.path.join(out, "initial.safetensors"))
    before = None
    if not on_meta:
        with whole_parameters(model):  # ZeRO-3: no engine runs the model yet, its forward needs whole weights
            before = matrix.held_out_loss(model)
    seen = []

    def evaluate():
        seen.append(partitioned(model))
        return {"loss": matrix.held_out_loss(model)}

    result = fit(model, matrix.TRAIN, matrix.collate, evaluate, "loss", False, options, os.path.join(out, "run"),
                 log=lambda _: None)
    outputs = matrix.held_out(model)
    with whole_parameters(model, trainable_only=True):  # every process takes part; the main one writes
        if is_main_process():
            model.save_pretrained(out)
    record = {"before": before, "after": outputs.loss.item(), "logits": outputs.logits.tolist(),
              "steps": result.steps, "best_step": result.best_step, "partitioned": any(seen)}
    torch.distributed.barrier()  # the adapter is on disk for every process
    if engine == "zero3" and method != "full":
        loaded = unipeft.PeftModel.from_pretrained(base_for(engine, options.engine, out), out)
        with whole_parameters(loaded):  # no DeepSpeed engine runs this model: its forward needs whole weights
            record["loaded_logits"] = matrix.held_out(loaded).logits.tolist()
    if engine == "fsdp" and method != "full":  # into a base FSDP already shards
        base = shard_fsdp(base_for(engine, options.engine, out), torch.device(matrix.DEVICE))
        record["loaded_logits"] = matrix.held_out(unipeft.PeftModel.from_pretrained(base, out)).logits.tolist()
    record["merged"] = merge_and_save(model, method, out)
    return record


def main() -> None:
    engine, out_dir, methods = sys.argv[1], sys.argv[2], sys.argv[3:]
    faulthandler.dump_traceback_later(float(os.environ.get("HANG_SECONDS", "150")), exit=True)  # a hang fails
    PartialState(cpu=matrix.DEVICE == "cpu")  # the process group, before anything gathers
    if is_main_process():
        matrix.base_model().save_pretrained(os.path.join(out_dir, "base"))
    torch.distributed.barrier()
    for method in methods:
        out = os.path.join(out_dir, method)
        try:
            record = train(engine, out)
        except Exception:  # the processes are out of step now: record the error and end the launch
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"error_{os.environ['RANK']}.txt"), "w") as fh:
                fh.write(traceback.format_exc())
            raise
        if is_main_process():
            with open(os.path.join(out, "result.json"), "w") as fh:
                json.dump(record, fh)


if __name__ == "__main__":
    main()
