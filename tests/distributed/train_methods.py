"""One launch of tests/test_distributed.py: train each method in turn under one engine, save it gathered.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/distributed/train_methods.py \
        ENGINE OUT_DIR METHOD [METHOD ...]

Per method, OUT_DIR/METHOD/ gets the saved adapter (save_pretrained; the whole model for full), the run folder
(run/: log.jsonl, checkpoint/) and result.json: held-out loss before and after, and whether some trainable
parameter was partitioned during training (ZeRO-3: numel 0; FSDP: a DTensor shard), so the gathering mattered.
A method that fails writes its traceback to OUT_DIR/METHOD/error_<rank>.txt and ends the launch.
"""
import faulthandler
import json
import os
import sys
import traceback

import matrix
from unipeft.train.engines import gathered
from unipeft.train.run import is_main_process
from unipeft.train.trainer import fit


def partitioned(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(p.numel() == 0 or isinstance(p, DTensor) and p.to_local().shape != p.shape
               for p in model.parameters() if p.requires_grad)


def train(engine: str, out: str) -> dict:
    method = os.path.basename(out)
    model = matrix.model_for(method)
    before = matrix.held_out_loss(model)
    seen = []

    def evaluate():
        seen.append(partitioned(model))
        return {"loss": matrix.held_out_loss(model)}

    options = matrix.options(engine, int(os.environ["WORLD_SIZE"]))
    if engine == "zero3":  # partition every parameter, however small (the shipped config keeps small ones whole)
        with open(options.engine) as fh:
            config = json.load(fh)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        options.engine = os.path.join(out, "zero3.json")
        os.makedirs(out, exist_ok=True)
        with open(options.engine, "w") as fh:
            json.dump(config, fh)
    result = fit(model, matrix.TRAIN, matrix.collate, evaluate, "loss", False, options, os.path.join(out, "run"),
                 log=lambda _: None)
    after = matrix.held_out_loss(model)
    with gathered(model):  # every process takes part; the main one writes
        if is_main_process():
            model.save_pretrained(out)
    return {"before": before, "after": after, "steps": result.steps, "best_step": result.best_step,
            "partitioned": any(seen)}


def main() -> None:
    engine, out_dir, methods = sys.argv[1], sys.argv[2], sys.argv[3:]
    faulthandler.dump_traceback_later(float(os.environ.get("HANG_SECONDS", "150")), exit=True)  # a hang fails
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
